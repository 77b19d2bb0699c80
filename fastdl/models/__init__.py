"""Models built only from fastdl ops and modules (none yet: see the README's roadmap)."""
