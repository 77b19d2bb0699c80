"""Third-party integrations: HuggingFace transformers (an attention implementation and its
RMS norms) and PyTorch Geometric (GCNConv, GATConv, SAGEConv, GINConv). Each module imports its
package, so import one only when that package is installed; fastdl.patch consults them itself."""
