"""The augmented views that the in-training and fine-tuning defenses train on, as their authors
made them.

- **Caption views** (:func:`eda`, :class:`CaptionViews`): EDA, "Easy Data Augmentation" (Wei &
  Zou 2019), as RoCLIP, SafeCLIP and CleanCLIP run it (``utils/eda.py:eda`` in each of
  BigML-CS-UCLA/RoCLIP, BigML-CS-UCLA/SafeCLIP and nishadsinghi/CleanCLIP, one file in all
  three; ``utils/augment_text.py:_augment_text`` keeps the first sentence of ``eda(caption)``):
  the caption is cleaned to lower-case letters and spaces, one sentence is made by each of
  synonym replacement, random insertion, random swap and random deletion (α = p = 0.1, so one
  word, or one in ten, each), and one of the four is kept. Each training row gets its view
  **once**, before training, and keeps it for the whole run, as their data loaders read it from
  the csv that ``augment_text`` wrote (or, in RoCLIP and SafeCLIP, from the list their dataset
  builds at start-up). Synonyms come from WordNet 3.0 through nltk, as theirs.
- **Image views** (:func:`simclr_view`): RoCLIP's and SafeCLIP's ``utils/augment_image.py``
  transform, a SimCLR-style flip, random resized crop, colour jitter (0.5, 0.5, 0.5, 0.1) at
  p 0.8, greyscale at p 0.2 and a Gaussian blur of kernel 21 on 224 px, drawn afresh each time
  an image is loaded. CleanCLIP's views are AutoAugment's (``trainers.defenses.cleanclip``).

Ours, where their code leaves a choice to chance or scale: each random step draws from a
generator of the trial's seed (``poison.streams.CAPTION_VIEWS``) where theirs draws from Python's
``random`` seeded once with 1; a word's synonyms are sorted (theirs are a ``set``, in string-hash
order, which changes with ``PYTHONHASHSEED``), and random insertion draws one of them (theirs
takes the set's first); the blur's kernel and σ range scale with the image side (21 px and
0.1-2.0 on 224 px), as the patch triggers state their size against 224 px.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torchvision.transforms import v2

from poison import streams
from poison.config import ConfigError

if TYPE_CHECKING:
    from trainers.data import TrainingSet

#: Where a system WordNet 3.0 database lives (Debian and Ubuntu's ``wordnet-base``).
SYSTEM_WORDNET = ("/usr/share/wordnet",)
WORDNET_HELP = ("install WordNet 3.0: Debian's wordnet-base (apt-get install wordnet-base) "
                "or nltk's (python -m nltk.downloader wordnet)")
#: EDA's stop words, never replaced by a synonym (nltk's English list of 2019 and the empty word).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves what which who whom this that these
those am is are was were be been being have has had having do does did doing a an the and but if or
because as until while of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where
why how all any both each few more most other some such no nor not only own same so than too very s
t can will just don should now""".split()) | {""}


# ---------------------------------------------------------------- WordNet


class WordNetMissing(ConfigError):
    """No WordNet 3.0 database where nltk or the system keeps one."""


@functools.lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader: nltk's own data (``nltk.download('wordnet')``), else a system
    database (:data:`SYSTEM_WORDNET`, or the folder ``POISONSWEEP_WORDNET`` names), copied once
    under the user's cache folder because nltk reads only inside its data paths and wants a
    ``lexnames`` file that the system packages leave out."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.data import FileSystemPathPointer

    try:
        from nltk.corpus import wordnet as reader

        reader.ensure_loaded()
        return reader
    except (LookupError, OSError):  # none, or a copy nltk cannot read as its own
        pass
    folders = [os.environ["POISONSWEEP_WORDNET"]] if os.environ.get("POISONSWEEP_WORDNET") else list(SYSTEM_WORDNET)
    source = next((Path(f) for f in folders if (Path(f) / "data.noun").is_file()), None)
    if source is None:
        raise WordNetMissing(f"EDA caption views need WordNet's synonyms: none in nltk's data or in "
                             f"{', '.join(folders)}; {WORDNET_HELP}")
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "poisonsweep" / "nltk_data"
    folder = root / "corpora" / "wordnet-system"  # not "wordnet": nltk's own loader must not take it for its corpus
    if not (folder / "lexnames").is_file():
        staging = folder.with_name(f"{folder.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, staging / path.name)
        # lexnames(5): the 45 lexicographer files' numbers; only their count is read here
        (staging / "lexnames").write_text("".join(f"{i:02d}\tfile.{i:02d}\t0\n" for i in range(45)))
        try:
            staging.rename(folder)  # whole, or not at all
        except OSError:  # another process's copy got there first
            shutil.rmtree(staging, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))

    class SystemWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # the mapping to WordNet 3.0 (for other languages): it is 3.0
            return None

    with warnings.catch_warnings():  # "multilingual functions are not available": none are used
        warnings.simplefilter("ignore", UserWarning)
        return SystemWordNet(FileSystemPathPointer(str(folder)), None)


@functools.lru_cache(maxsize=65536)
def synonyms(word: str) -> tuple[str, ...]:
    """EDA's synonyms of ``word``: every lemma of every WordNet synset of it (nltk's ``synsets``,
    which lemmatises), lower-cased, ``_`` and ``-`` as spaces, letters and spaces only, the word
    itself left out; sorted (see the module docstring)."""
    found = set()
    for synset in wordnet().synsets(word):
        for lemma in synset.lemmas():
            name = lemma.name().replace("_", " ").replace("-", " ").lower()
            found.add("".join(c for c in name if c in _LETTERS))
    found.discard(word)
    return tuple(sorted(found))


# ---------------------------------------------------------------- EDA

_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz ")


def clean(line: str) -> str:
    """EDA's cleaning: apostrophes dropped, hyphens, tabs and newlines as spaces, lower case,
    anything but letters and spaces as a space, runs of spaces as one, one leading space removed.

    >>> clean("A  blue-green CIRCLE, isn't it?")
    'a blue green circle isnt it '
    """
    line = line.replace("’", "").replace("'", "").replace("-", " ").replace("\t", " ").replace("\n", " ").lower()
    line = re.sub(" +", " ", "".join(c if c in _LETTERS else " " for c in line))
    return line.removeprefix(" ")


def synonym_replacement(words: list[str], n: int, rng: np.random.Generator,
                        lookup: Callable[[str], tuple[str, ...]] | None = None) -> list[str]:
    """Up to ``n`` distinct non-stop words, in random order, each replaced everywhere by one of
    its synonyms drawn at random (a word without synonyms is passed over); ``lookup``: a word's
    synonyms (default :func:`synonyms`)."""
    lookup = lookup or synonyms
    out = list(words)
    candidates = sorted({w for w in words if w not in STOP_WORDS})
    replaced = 0
    for word in (candidates[i] for i in rng.permutation(len(candidates))):
        options = lookup(word)
        if options:
            choice = options[rng.integers(len(options))]
            out = [choice if w == word else w for w in out]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(out).split(" ")  # a synonym of several words becomes several words


def random_insertion(words: list[str], n: int, rng: np.random.Generator,
                     lookup: Callable[[str], tuple[str, ...]] | None = None) -> list[str]:
    """``n`` times: a synonym of a random word put before a random word. A word without synonyms
    is redrawn; the tenth draw gives up that insertion whatever it finds (their counter is
    checked before the synonyms are)."""
    lookup = lookup or synonyms
    out = list(words)
    for _ in range(n):
        for attempt in range(10):
            options = lookup(out[rng.integers(len(out))])
            if attempt == 9:
                options = ()
            if options:
                break
        if options:
            out.insert(int(rng.integers(len(out))), options[rng.integers(len(options))])
    return out


def random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` times: two random positions trade words; the second is redrawn while it equals the
    first, and the fourth draw gives up that swap whatever it finds (their counter is checked
    before the positions are compared).

    >>> random_swap(["a", "b"], 1, np.random.default_rng(0))
    ['b', 'a']
    """
    out = list(words)
    for _ in range(n):
        first = second = int(rng.integers(len(out)))
        for attempt in range(4):
            second = int(rng.integers(len(out)))
            if attempt == 3:
                break
            if second != first:
                out[first], out[second] = out[second], out[first]
                break
    return out


def random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each word dropped with probability ``p``; a single word stays, and if all go one random
    word is kept."""
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[int(rng.integers(len(words)))]]


def eda(sentence: str, rng: np.random.Generator, *, alpha_sr: float = 0.1, alpha_ri: float = 0.1,
        alpha_rs: float = 0.1, p_rd: float = 0.1,
        lookup: Callable[[str], tuple[str, ...]] | None = None) -> str:
    """One EDA view of ``sentence`` (``eda(...)[0]`` at ``num_aug=1``, as the defenses call it):
    one sentence from each operation whose rate is positive, cleaned, and one of them kept at
    random. An empty caption stays empty.

    >>> eda("Two dogs.", np.random.default_rng(0), alpha_sr=0, alpha_ri=0, p_rd=0)  # a swap only
    'dogs two'
    """
    words = [w for w in clean(sentence).split(" ") if w]
    if not words:
        return clean(sentence)
    n = len(words)
    made = []
    if alpha_sr > 0:
        made.append(synonym_replacement(words, max(1, int(alpha_sr * n)), rng, lookup))
    if alpha_ri > 0:
        made.append(random_insertion(words, max(1, int(alpha_ri * n)), rng, lookup))
    if alpha_rs > 0:
        made.append(random_swap(words, max(1, int(alpha_rs * n)), rng))
    if p_rd > 0:
        made.append(random_deletion(words, p_rd, rng))
    if not made:
        return clean(sentence)
    return clean(" ".join(made[int(rng.integers(len(made)))]))


class CaptionViews:
    """Fixed EDA views of every row's caption in a training set, made once (a view per row, as
    the authors' csv column), tokenized; ``tokens(rows)`` gives the rows' token ids. The same
    seed and ``view`` number give the same views; another ``view`` number another set (SafeCLIP
    keeps two per pair)."""

    def __init__(self, data: TrainingSet, seed: int, view: int = 0) -> None:
        rng = streams.rng(seed, streams.CAPTION_VIEWS, view)
        captions = data.captions
        texts = [eda(captions[i], rng) for i in data.caption]
        distinct, index = np.unique(np.array(texts, dtype=object), return_inverse=True)
        self.table = data.tokenize([str(t) for t in distinct])
        self.index = torch.from_numpy(index.reshape(-1))
        self.texts = texts

    def __len__(self) -> int:
        return len(self.index)

    def tokens(self, rows: np.ndarray) -> torch.Tensor:
        return self.table[self.index[torch.as_tensor(np.asarray(rows))]]


def augment_tokens(tokens: torch.Tensor, drop: float) -> torch.Tensor:
    """Ours (``caption_view: token-edit``), EDA's random deletion and random swap on token ids
    (torch's RNG), for a run without WordNet: between the start token and the end token (the
    row's largest id), each token is dropped with probability ``drop`` (one is always kept),
    then two of the rest trade places; the end token follows the last one and the row is
    zero-padded as before.

    Example:
        >>> augment_tokens(torch.tensor([[9, 5, 6, 10, 0]]), drop=0.0)  # doctest: +SKIP
        tensor([[ 9,  6,  5, 10,  0]])
    """
    rows = tokens.cpu()
    out = torch.zeros_like(rows)
    for i, row in enumerate(rows):
        end = int(row.argmax())
        inner = row[1:end]
        if len(inner):
            keep = torch.rand(len(inner)) >= drop
            if not keep.any():
                keep[torch.randint(len(inner), ())] = True
            inner = inner[keep]
        if len(inner) >= 2:
            a, b = torch.randperm(len(inner))[:2].tolist()
            inner[[a, b]] = inner[[b, a]]
        view = torch.cat([row[:1], inner, row[end : end + 1]])
        out[i, : len(view)] = view
    return out.to(tokens.device)


CaptionView = Literal["eda", "token-edit"]


class CaptionSource:
    """A defense's caption views of the rows it trains on, by ``kind``: ``eda``, the authors'
    (one fixed EDA variant per row, :class:`CaptionViews`, view number ``view``), or
    ``token-edit``, ours (:func:`augment_tokens`, drawn afresh at every call). ``bind`` it to the
    training set first (``Objective.start_epoch``: ``pairs.data``); the EDA views are made once
    per training set."""

    def __init__(self, kind: CaptionView, seed: int, view: int = 0, token_drop: float = 0.1) -> None:
        self.kind, self.seed, self.view, self.token_drop = kind, seed, view, token_drop
        self.data: TrainingSet | None = None
        self.fixed: CaptionViews | None = None

    def bind(self, data: TrainingSet) -> None:
        if data is not self.data:
            self.data = data
            self.fixed = CaptionViews(data, self.seed, self.view) if self.kind == "eda" else None

    def tokens(self, rows: np.ndarray) -> torch.Tensor:
        """The views' token ids (CPU) of the training set's ``rows``."""
        if self.data is None:
            raise RuntimeError("CaptionSource.tokens before bind(): the objective's start_epoch binds it")
        if self.fixed is not None:
            return self.fixed.tokens(rows)
        return augment_tokens(self.data.tokens[self.data.caption[rows]], self.token_drop)


def require_wordnet(key: str, kind: CaptionView) -> None:
    """Raises :class:`WordNetMissing` naming ``key`` when ``kind`` is ``eda`` and WordNet is missing."""
    if kind == "eda":
        try:
            wordnet()
        except WordNetMissing as error:
            raise WordNetMissing(f"{key}: {error} (or {key}: token-edit, ours, which needs none)") from None


# ---------------------------------------------------------------- images


def simclr_view(side: int) -> v2.Compose:
    """RoCLIP's and SafeCLIP's image augmentation at ``side`` px (module docstring), on uint8
    (3, H, W) tensors: flip, resized crop to ``side`` (scale 0.08-1), colour jitter at p 0.8,
    greyscale at p 0.2, Gaussian blur of 21 px and σ 0.1-2.0 on 224 px, scaled to ``side``."""
    scale = side / 224
    kernel = max(1, round(21 * scale) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomResizedCrop(size=side, antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.GaussianBlur(kernel_size=kernel, sigma=(0.1 * scale, 2.0 * scale)),
    ])


def augment_images(images: np.ndarray, augment: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """uint8 (B, H, W, 3) images, each through ``augment`` with its own random draw (torch's RNG)."""
    chw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return torch.stack([augment(image) for image in chw]).permute(0, 2, 3, 1).numpy()


__all__ = ["CaptionSource", "CaptionView", "CaptionViews", "WordNetMissing", "augment_images", "augment_tokens",
           "clean", "eda", "random_deletion", "random_insertion", "random_swap", "require_wordnet", "simclr_view",
           "synonym_replacement", "synonyms", "wordnet"]
