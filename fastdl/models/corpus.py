"""Text made in the project for the sequence models: a small probabilistic grammar of English-like
sentences, generated deterministically (no downloads, no copied text).

The grammar has number agreement (``the cat sleeps`` / ``the cats sleep``), present and past
tense, optional adjectives, prepositional phrases and a second clause joined by a conjunction,
so a language model has structure to learn beyond word frequencies. ``words()`` gives the word
stream and its vocabulary (a few hundred words), ``chars()`` the same text as characters,
``clauses()`` short single clauses for the encoder-decoder task.
"""

import functools
import random

import torch


def _words(text: str) -> list[str]:
    return text.split()


def _groups(text: str, size: int) -> list[tuple[str, ...]]:
    """Consecutive ``size``-word groups of a whitespace-separated word list."""
    w = _words(text)
    return [tuple(w[i : i + size]) for i in range(0, len(w), size)]


# (singular, plural)
NOUNS = _groups(
    """
    cat cats  dog dogs  bird birds  fox foxes  horse horses  child children  teacher teachers
    farmer farmers  king kings  queen queens  sailor sailors  baker bakers  doctor doctors
    river rivers  tree trees  house houses  city cities  garden gardens  mountain mountains
    boat boats  road roads  letter letters  song songs  book books  window windows
    stone stones  lamp lamps  apple apples  wolf wolves  friend friends  student students
    painter painters  bridge bridges  forest forests  island islands  clock clocks  door doors
    cloud clouds  ship ships  village villages  soldier soldiers  mouse mice  owl owls
    field fields  machine machines  story stories  table tables  market markets
    """,
    2,
)
ADJECTIVES = _words(
    """
    small large old young quiet loud bright dark green red blue golden tired happy sad brave
    clever strange gentle wild cold warm busy lazy heavy empty distant hidden careful proud
    silver wooden ancient tiny curious hungry honest narrow broken famous
    """
)
# (third person singular, base, past)
TRANSITIVE = _groups(
    """
    sees see saw  finds find found  follows follow followed  carries carry carried
    watches watch watched  paints paint painted  builds build built  visits visit visited
    helps help helped  reads read read  opens open opened  hears hear heard  loves love loved
    chases chase chased  remembers remember remembered  greets greet greeted  sells sell sold
    buys buy bought  holds hold held  leaves leave left  writes write wrote
    counts count counted  keeps keep kept  brings bring brought  crosses cross crossed
    guards guard guarded  mends mend mended  teaches teach taught
    """,
    3,
)
INTRANSITIVE = _groups(
    """
    sleeps sleep slept  runs run ran  sings sing sang  waits wait waited  laughs laugh laughed
    falls fall fell  works work worked  dances dance danced  rests rest rested
    travels travel traveled  wanders wander wandered  shines shine shone  grows grow grew
    listens listen listened  dreams dream dreamed  returns return returned  speaks speak spoke
    swims swim swam
    """,
    3,
)
ADVERBS = _words(
    """
    slowly quickly quietly often rarely again today yesterday gladly suddenly softly alone
    together early late happily always never
    """
)
PREPOSITIONS = _words("near under behind beside across inside above with without along past toward")
DETERMINERS = {
    False: _words("the a this that every one my our"),
    True: _words("the some these those many two three my our few"),
}
CONJUNCTIONS = ["and", "but", "while", "because", "so", "until"]
PUNCTUATION = [".", ","]
SPECIALS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2


def _vocabulary() -> list[str]:
    words = {w for pair in NOUNS for w in pair}
    words.update(ADJECTIVES, ADVERBS, PREPOSITIONS, CONJUNCTIONS, PUNCTUATION)
    words.update(w for forms in TRANSITIVE + INTRANSITIVE for w in forms)
    words.update(w for dets in DETERMINERS.values() for w in dets)
    return SPECIALS + sorted(words)


VOCAB = _vocabulary()
PAD, BOS, EOS = 0, 1, 2
# The characters of the text: the letters of the vocabulary, the punctuation and the space.
ALPHABET = "".join(sorted(set(" ".join(VOCAB[len(SPECIALS) :]))))


class _Grammar:
    """sentence := clause [, conjunction clause] .
    clause := noun-phrase verb-phrase; the verb agrees with the subject in the present tense.
    noun-phrase := determiner adjective{0,2} noun [preposition noun-phrase] (depth-limited)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def noun_phrase(self, depth: int) -> tuple[list[str], bool]:
        """The words and whether the head noun is plural."""
        rng, plural = self.rng, self.rng.random() < 0.4
        words = [rng.choice(DETERMINERS[plural])]
        words += rng.sample(ADJECTIVES, rng.choice((0, 0, 1, 1, 2)))
        words.append(rng.choice(NOUNS)[plural])
        if depth > 0 and rng.random() < 0.25:
            words += [rng.choice(PREPOSITIONS), *self.noun_phrase(depth - 1)[0]]
        return words, plural

    def clause(self, past: bool, depth: int = 1) -> list[str]:
        rng = self.rng
        words, plural = self.noun_phrase(depth)
        transitive = rng.random() < 0.6
        forms = rng.choice(TRANSITIVE if transitive else INTRANSITIVE)
        words.append(forms[2] if past else forms[1] if plural else forms[0])
        if transitive:
            words += self.noun_phrase(depth)[0]
        elif rng.random() < 0.3:
            words += [rng.choice(PREPOSITIONS), *self.noun_phrase(0)[0]]
        if rng.random() < 0.3:
            words.append(rng.choice(ADVERBS))
        return words

    def sentence(self) -> list[str]:
        past = self.rng.random() < 0.4
        words = self.clause(past)
        if self.rng.random() < 0.3:
            words += [",", self.rng.choice(CONJUNCTIONS), *self.clause(past)]
        return [*words, "."]


@functools.cache
def _sentences(count: int, seed: int) -> tuple[tuple[str, ...], ...]:
    grammar = _Grammar(random.Random(seed))
    return tuple(tuple(grammar.sentence()) for _ in range(count))


@functools.cache
def words(count: int = 20000, seed: int = 0) -> torch.Tensor:
    """The token ids (int64, into VOCAB) of ``count`` generated sentences, one stream."""
    index = {w: i for i, w in enumerate(VOCAB)}
    return torch.tensor([index[w] for s in _sentences(count, seed) for w in s])


def text(count: int = 20000, seed: int = 0) -> str:
    """The generated sentences as plain text: ``the old cat sleeps. two dogs ran, but ...``."""
    return (
        " ".join(" ".join(s) for s in _sentences(count, seed)).replace(" .", ".").replace(" ,", ",")
    )


@functools.cache
def chars(count: int = 20000, seed: int = 0) -> torch.Tensor:
    """The text of :func:`text` as character ids (int64, into ALPHABET)."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index[c] for c in text(count, seed)])


@functools.cache
def clauses(count: int, max_len: int, seed: int = 1) -> torch.Tensor:
    """``count`` single present- or past-tense clauses of at most ``max_len`` words, without
    prepositional phrases, as a (count, max_len) int64 tensor of VOCAB ids right-padded with
    PAD."""
    grammar, index = _Grammar(random.Random(seed)), {w: i for i, w in enumerate(VOCAB)}
    out = torch.full((count, max_len), PAD)
    row = 0
    while row < count:
        clause = grammar.clause(past=grammar.rng.random() < 0.4, depth=0)
        if len(clause) <= max_len:
            out[row, : len(clause)] = torch.tensor([index[w] for w in clause])
            row += 1
    return out
