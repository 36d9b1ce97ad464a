"""Offline downstream tasks for lm-evaluation-harness, built from the embedded corpus's validation documents.

    python -m pipeline.tasks --out data/tasks

No dataset hub is reachable here, so the paper's LAMBADA, HellaSwag and WikiText are replaced by stand-ins
scored the same way, on documents no student trains on: the val split that `cocomix tokenize` draws with the
same seed and val fraction (`split_of`, by document id). They are stand-ins, not those benchmarks.

- cocomix_cloze (LAMBADA-style): a passage of 25 to 80 words ending in a sentence, and that sentence's last
  word (a content word: LAMBADA's targets were also chosen by humans to need the passage, these are not);
  scored by log-likelihood (perplexity) and exact greedy match (acc).
- cocomix_continuation (HellaSwag-style): one to three sentences of a paragraph, the true next sentence
  against three sentences of other validation documents of the same source, of similar length; acc and
  length-normalised acc_norm, as lm-eval scores HellaSwag.
- cocomix_ppl (WikiText-style): every validation document whole, rolling-window log-likelihood; word and
  byte perplexity and bits per byte.

Each task is a harness YAML beside its jsonl file; `local_data.py` (written here too) loads the jsonl from
the YAMLs' own folder, so the tasks load from any working directory. The YAMLs' metadata records the split,
the corpus files' hashes and the fingerprint of the tokenizer of the students they are meant for.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import typer
from typer._click.exceptions import ClickException  # typer vendors click

from pipeline.tokenize import find_sources, read_documents, split_of
from storage_schemas import UserError, sha256_file, tokenizer_fingerprint

TAG = "cocomix_offline"
MAX_CONTEXT_WORDS, MIN_CONTEXT_WORDS = 80, 25
# a sentence ends at . ! or ? (and a closing quote or bracket) before a capital, except after a title
SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])[\"')\]]?\s+(?=[\"'(]?[A-Z])")
LAST_WORD = re.compile(r" ([A-Za-z]{3,})[.!?][\"')\]]?$")  # the target: the last word, its punctuation dropped

FUNCTION_WORDS = frozenset("""the and but for nor yet not was were are has had have his her him hers its their them they
this that these those there then than with from into upon what which who whom whose when where while will would
shall should can could may might must been being does did done any all some one ones you your our she very much
more most such only also just too""".split())

LOADER = '''"""Loads the jsonl files beside this file for the task YAMLs here (their `custom_dataset`), so that the
tasks load from any working directory and offline: `datasets`' packaged json builder needs no hub.
Written by `python -m pipeline.tasks`."""

from pathlib import Path


def load(data_files: dict, **metadata):
    import datasets

    here = Path(__file__).resolve().parent
    return datasets.load_dataset("json", data_files={split: str(here / name) for split, name in data_files.items()})
'''


@dataclass(frozen=True)
class TaskBuildConfig:
    """One `python -m pipeline.tasks` call."""

    out: Path = Path("data/tasks")
    corpus: tuple[Path, ...] = (Path("data/corpus"),)
    tokenizer: Path = Path("data/demo/teacher")
    """Folder of the tokenizer the students use (the demo's: the shipped teacher's); its fingerprint is recorded."""
    seed: int = 0
    """The train/val split seed of `cocomix tokenize` (the Makefile's --seed 0)."""
    val_fraction: float = 0.03
    n_cloze: int = 250
    n_choice: int = 250
    sample_seed: int = 0
    """Seed of the choice of items and of distractors."""

    def __post_init__(self):
        if self.n_cloze < 1 or self.n_choice < 1:
            raise UserError("--n-cloze and --n-choice must be positive")


@dataclass(frozen=True)
class Doc:
    key: str
    source: str  # the corpus file's name less its suffix, as TokenStore.source_names
    text: str


def val_documents(cfg: TaskBuildConfig) -> list[Doc]:
    docs = [Doc(key, Path(name).name.split(".", 1)[0], text)
            for path, name in find_sources(cfg.corpus) for key, text in read_documents(path, name)
            if split_of(key, cfg.seed, cfg.val_fraction) == "val"]
    if not docs:
        raise UserError(f"no validation documents in {', '.join(map(str, cfg.corpus))} at val fraction "
                        f"{cfg.val_fraction}: raise --val-fraction")
    return docs


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each with its line wrapping folded into single spaces."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph) if s]


def words(text: str) -> int:
    return len(text.split())


def tail(paras: list[str], max_words: int) -> str:
    """The last paragraphs of `paras` that fit in max_words; the first kept one loses leading sentences."""
    kept, n = [], 0
    for p in reversed(paras):
        sents = sentences(p)
        while sents and n + words(" ".join(sents)) > max_words:
            sents = sents[1:]
        if not sents:
            break
        kept.insert(0, " ".join(sents))
        n += words(kept[0])
        if len(sents) < len(sentences(p)):
            break
    return "\n\n".join(kept)


def cloze_items(doc: Doc, rng: random.Random) -> list[dict]:
    """At most one item per paragraph: the passage up to the last word of one of its sentences (a content
    word: not a function word, three letters or more), and that word."""
    paras, items = paragraphs(doc.text), []
    for i, p in enumerate(paras):
        sents, found = sentences(p), []
        for j in range(len(sents)):
            m = LAST_WORD.search(sents[j])
            if not m or m.group(1).lower() in FUNCTION_WORDS:
                continue
            before = " ".join([*sents[:j], sents[j][: m.start()]])
            context = tail([*paras[max(0, i - 4) : i], before], MAX_CONTEXT_WORDS)
            if words(context) >= MIN_CONTEXT_WORDS:
                found.append({"context": context, "target": m.group(1), "source": doc.source, "doc": doc.key})
        if found:
            items.append(rng.choice(found))
    return items


def choice_items(doc: Doc) -> list[dict]:
    """Every sentence of a paragraph that follows one to three sentences of it (12 to 80 words), as the
    true ending of those sentences."""
    items = []
    for p in paragraphs(doc.text):
        sents = sentences(p)
        for j in range(1, len(sents)):
            context = " ".join(sents[max(0, j - 3) : j])
            if 6 <= words(sents[j]) <= 40 and 12 <= words(context) <= MAX_CONTEXT_WORDS:
                items.append({"context": context, "ending": sents[j], "source": doc.source, "doc": doc.key})
    return items


def add_distractors(item: dict, pool: list[tuple[str, str]], rng: random.Random, k: int = 3) -> dict | None:
    """Shuffle the true ending among k sentences of other documents of similar length (a half to twice
    its words), so that length alone does not give the answer away; None when too few qualify."""
    n = words(item["ending"])
    fits = [s for key, s in pool if key != item["doc"] and n / 2 <= words(s) <= 2 * n and s != item["ending"]]
    if len(fits) < k:
        return None
    choices = rng.sample(fits, k)
    label = rng.randrange(k + 1)
    choices.insert(label, item["ending"])
    return {"context": item["context"], "choices": choices, "label": label, "source": item["source"],
            "doc": item["doc"]}


def balanced(items: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n items, an equal share from each source (all of a source's items when it has fewer), in corpus order."""
    sources = sorted({it["source"] for it in items})
    picked = []
    for s in sources:
        mine = [i for i, it in enumerate(items) if it["source"] == s]
        picked += rng.sample(mine, min(len(mine), n // len(sources)))
    return [items[i] for i in sorted(picked)]


def build_items(cfg: TaskBuildConfig, docs: list[Doc]) -> dict[str, list[dict]]:
    rng = random.Random(cfg.sample_seed)
    cloze = balanced([it for d in docs for it in cloze_items(d, rng)], cfg.n_cloze, rng)
    pools = {s: [(d.key, s_) for d in docs if d.source == s for p in paragraphs(d.text) for s_ in sentences(p)]
             for s in {d.source for d in docs}}
    choice = [it for d in docs for it in choice_items(d)]
    choice = [c for it in balanced(choice, cfg.n_choice, rng) if (c := add_distractors(it, pools[it["source"]], rng))]
    ppl = [{"text": d.text, "source": d.source, "doc": d.key} for d in docs]
    return {"cocomix_cloze": cloze, "cocomix_continuation": choice, "cocomix_ppl": ppl}


SCORING = {
    "cocomix_cloze": """output_type: loglikelihood
doc_to_text: context
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "cocomix_continuation": """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "cocomix_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
}
STAND_IN = {"cocomix_cloze": "LAMBADA (lambada_openai)", "cocomix_continuation": "HellaSwag (hellaswag)",
            "cocomix_ppl": "WikiText (wikitext)"}


def task_yaml(name: str, n: int, meta: dict) -> str:
    head = (f"# Generated by `python -m pipeline.tasks`: {n} items from the validation documents of the embedded\n"
            f"# corpus, a stand-in for {STAND_IN[name]} scored as lm-eval scores it; not that benchmark.\n")
    return (head + f"tag: {TAG}\ntask: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {name}.jsonl\ncustom_dataset: !function local_data.load\ntest_split: test\n"
            + SCORING[name] + "metadata:\n  version: 1.0\n"
            + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in meta.items()))


def build(cfg: TaskBuildConfig) -> dict[str, int]:
    """Write the three tasks (YAML + jsonl) and local_data.py into cfg.out, replacing it whole; item counts."""
    if not Path(cfg.tokenizer).is_dir():
        raise UserError(f"tokenizer folder {cfg.tokenizer} does not exist: pass --tokenizer DIR")
    docs = val_documents(cfg)
    items = build_items(cfg, docs)
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(cfg.tokenizer), "split_seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "sample_seed": cfg.sample_seed,
            "corpus": {p.name: sha256_file(p) for p, _ in find_sources(cfg.corpus)}}
    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "local_data.py").write_text(LOADER)
    for name, rows in items.items():
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (tmp / f"{name}.yaml").write_text(task_yaml(name, len(rows), meta))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {name: len(rows) for name, rows in items.items()}


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def command(out: Path = typer.Option(TaskBuildConfig.out, "--out", help="task folder to (re)write"),
            corpus: list[Path] = typer.Option(list(TaskBuildConfig.corpus), "--corpus"),
            tokenizer: Path = typer.Option(TaskBuildConfig.tokenizer, "--tokenizer",
                                           help="tokenizer folder of the students the tasks are for"),
            seed: int = typer.Option(0, "--seed", help="split seed of `cocomix tokenize`"),
            val_fraction: float = typer.Option(0.03, "--val-fraction"),
            n_cloze: int = typer.Option(TaskBuildConfig.n_cloze, "--n-cloze"),
            n_choice: int = typer.Option(TaskBuildConfig.n_choice, "--n-choice")) -> None:
    """Build the offline downstream tasks from the corpus's validation documents."""
    counts = build(TaskBuildConfig(out, tuple(corpus), tokenizer, seed, val_fraction, n_cloze, n_choice))
    typer.echo(", ".join(f"{name}: {n} items" for name, n in counts.items()) + f" -> {out}")


def main() -> None:
    """A user's mistake is one line and exit code 2, as in `cocomix`."""
    try:
        typer.main.get_command(app).main(standalone_mode=False)
    except (UserError, ClickException) as e:
        typer.echo(f"error: {e.format_message() if isinstance(e, ClickException) else e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
