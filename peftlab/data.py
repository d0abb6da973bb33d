"""Load splits (hub or local csv/tsv/jsonl/parquet) through `datasets`, map columns and labels, tokenize.

Every split becomes rows of {text, label}; then the task tokenizes them (cached by `datasets` on disk, so a
second run skips tokenization) and batches are padded dynamically by the collator.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

from .bases import file_sha256
from .config import FORMATS, DataConfig, Recipe, SplitConfig, class_index, label_indexer, recipe_argument, spelled
from .errors import ConfigError, DataError, DataFileNotFound
from .rundir import file_version
from .tasks import get_task
from .tasks.generative import check_references, data_row, reference_lists

log = logging.getLogger(__name__)
MIN_EVAL_ROWS = 20  # fewer held-out rows than this: warned about



@dataclass
class TaskData:
    """Tokenized splits, label names and the collator that pads a batch."""

    train: Any
    eval: Any
    test: Any
    label_names: list[str]
    collate: Callable
    eval_collate: Callable | None = None  # for the final evaluation, when the task needs more than model inputs (e.g. reference texts)
    train_sampler: Callable | None = None  # (train config, processes) -> the training rows' order, when the task has its own (multitask)


class LengthGroupedSampler:
    """Shuffled order in which neighbouring rows have similar lengths, so dynamically padded batches waste little.

    Each epoch: shuffle (seed + epoch), cut into megabatches of `batch_size x mega` rows, sort each megabatch by length
    and cut it into batches, then shuffle the batches within it (the longest goes first, so an out-of-memory shows at
    once). On SST-2 with batch 32 it cuts the padded tokens from 3.3x the real ones to 1.05x. Row order only: the
    DataLoader (and Accelerate, across processes) still forms the batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 50):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        for start in range(0, len(order), size):
            rows = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            full = [b for b in batches if len(b) == self.batch_size]  # a short tail batch stays last, as in plain batching
            first, rest = (full[0], full[1:]) if full else ([], [])
            perm = torch.randperm(len(rest), generator=g).tolist()
            for batch in [first, *(rest[i] for i in perm), *batches[len(full):]]:
                yield from batch


def _format(spec: SplitConfig, where: str = "data.SPLIT") -> str:
    if spec.format != "auto":
        return spec.format
    fmt = FORMATS.get(Path(spec.path).suffix.lower())
    if fmt is None:
        raise DataError(f"{where}.path: cannot tell the format of '{spec.path}' from its extension "
                        f"({', '.join(FORMATS)} are known). Set it: {where}.format=csv|tsv|json|parquet (json reads JSON lines too).")
    return fmt


def delimited_rows(f, fmt: str):
    """A csv/tsv file's rows as read_split's loader reads them: a tsv's quote characters are text (GLUE-style TSVs)."""
    return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)


def check_header_line(spec: SplitConfig, fmt: str, where: str) -> list[str]:
    """A csv/tsv file's first line, checked; returns the file's column names (column_names, else the header's). With
    column_names (a file without a header) it must not be a header: it became a training row, its label a class. It
    is one when, case and spaces aside, its cells are the names column_names gives (in any order), or one of its
    cells is the word column_names names its own column (`text,label` read with [sentence, label]: a label 'label',
    or a text 'Sentence', is a header's word, not a row's value; names that are numbers are left out, a row may well
    hold them). And it must have as many cells as column_names has names (more: pandas made the extra leading fields
    an index; fewer: the columns named beyond them were read empty). Without column_names, its names must be distinct
    (pandas renamed the second 'sentence' to 'sentence.1', and the first was read with no word)."""
    if fmt not in ("csv", "tsv"):
        return []
    with open(spec.path, encoding="utf-8-sig", errors="replace", newline="") as f:
        try:
            first = next(delimited_rows(f, fmt), [])
        except csv.Error:  # a cell over the csv module's 128 KiB limit (a long document, which pandas reads): no header's
            first = []
    names = [c.strip() for c in first]
    if spec.column_names:
        given = [str(c).strip().casefold() for c in spec.column_names]
        folded = [n.casefold() for n in names]
        own = [n for n, g in zip(names, given) if n.casefold() == g and any(ch.isalpha() for ch in g)]
        if own or (folded and set(folded) <= set(given)):
            why = "it names the columns" if sorted(folded) == sorted(given) else f"its cell(s) {own or names} are column names"
            then = "" if folded == given else f", and set {section(where)}.text_columns / label_column to the header's names"
            raise DataError(f"{where}: the file's first line is a header ({', '.join(names)}; {why}), and {where}.column_names "
                            f"names the columns too, so it would be read as a data row (its label a class). Remove "
                            f"{where}.column_names{then}, or delete the header line.")
        if names and len(names) != len(given):  # (too long: the columns it names beyond the file's were read empty)
            raise DataError(f"{where}.column_names is too {'short' if len(names) > len(given) else 'long'}: it names {len(given)} "
                            f"column(s) {list(spec.column_names)}, and the file has {len(names)} (its first line: "
                            f"{', '.join(names)[:200]}). Name every column, in order, and no more (a column no key reads may "
                            "have any name).")
    if not spec.column_names and (twice := sorted({n for n in names if names.count(n) > 1})):
        raise DataError(f"{where}: the header names {twice} more than once: which column is meant is ambiguous. Rename "
                        f"them in the file, or name every column with {where}.column_names (the header line removed).")
    return [str(c) for c in spec.column_names] if spec.column_names else first


def read_split(spec: SplitConfig, data: DataConfig, where: str):
    """Load one split as a `datasets.Dataset`, raw columns untouched."""
    import datasets

    if spec.split is not None:
        try:
            return datasets.load_dataset(data.dataset, data.subset, split=spec.split)
        except Exception as e:
            raise DataError(f"{where}: cannot load hub dataset {data.dataset!r} ({data.subset}) split {spec.split!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Offline? Point {where}.path "
                            "at a local file instead.") from None
    path = Path(spec.path)
    if path.is_dir():
        raise DataFileNotFound(f"{where}.path: '{spec.path}' is a folder; a split is one data file "
                               f"({', '.join(FORMATS)}). Point it at the file: {where}.path=FOLDER/FILE.")
    if not path.is_file():
        raise DataFileNotFound(f"{where}.path: '{spec.path}' not found. Fix the path (relative to the working directory "
                               f"{Path.cwd()}) or override it: {where}.path=FILE.")
    if path.stat().st_size == 0:
        raise DataError(f"{where}.path: '{spec.path}' is empty. Point it at a file with rows.")
    fmt = _format(spec, where)
    if fmt == "json" and (bad := _undecodable(path)) is not None:  # pyarrow reads such bytes; the rows' first read failed
        raise DataError(_encoding_message(spec.path, bad, where))
    columns = check_header_line(spec, fmt, where)
    kwargs: dict[str, Any] = {}
    if fmt in ("csv", "tsv"):
        kwargs["delimiter"] = "\t" if fmt == "tsv" else ","
        # every column is text as written: pandas read an all-digit column as numbers ('007' became '7', a label '01'
        # the class index 1); a label column of integers is made one after the read (_integer_labels)
        kwargs["converters"] = {c: str for c in columns}
        if fmt == "tsv":
            kwargs["quoting"] = csv.QUOTE_NONE  # GLUE-style TSVs contain bare quote characters
        # only an empty cell is missing: pandas' default also read NA, N/A, None, null, NaN, nan (a text, a class "None") as one
        kwargs["keep_default_na"], kwargs["na_values"] = False, [""]
        if spec.column_names:
            kwargs["column_names"] = spec.column_names
            kwargs["header"] = None
    builder = {"tsv": "csv"}.get(fmt, fmt)
    # the file as named: datasets reads data_files as a glob ('reviews[a].csv' read 'reviewsa.csv'); and its cache by
    # content: datasets keys a local file by path, size and mtime, so a file rewritten with the same size and mtime
    # (cp -p, rsync -a, a relabelling that flips 0 and 1) was served from the cache as it was
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "peftlab-files" / file_sha256(path)[:16]
    quiet = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")  # its 'Failed to read file' line repeats ours
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files={"data": glob.escape(str(path))}, split="data", cache_dir=str(cache), **kwargs)
    except Exception as e:  # datasets wraps parser errors in its own types
        if (bad := _decode_error(e)) is not None or _utf16(spec.path):  # (a UTF-16 JSON file fails as a JSON error)
            raise DataError(_encoding_message(spec.path, bad, where)) from None
        if "corresponds to no data" in str(e):
            raise DataError(f"{where}.path: '{spec.path}' has no rows (a header only?). Point it at a file with data.") from None
        cause = e.__cause__ or e
        if fmt == "json" and (line := _json_problem(path)):  # (pyarrow's 'The document is empty..' named no line)
            raise DataError(f"{where}.path: cannot parse '{spec.path}' as JSON: {line}. Fix that line (one JSON object per "
                            "line, or one JSON array of objects).") from None
        hint = f" {TSV_UNQUOTED.format(where=where)}" if fmt == "tsv" and "Expected" in str(cause) else ""
        raise DataError(f"{where}.path: cannot parse '{spec.path}' as {fmt}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}. Check format/delimiter/column_names.{hint}") from None
    finally:
        quiet.setLevel(level)
    if len(ds) == 0:
        raise DataError(f"{where}.path: '{spec.path}' has no rows. Point it at a file with data.")
    if fmt in ("csv", "tsv") and PHANTOM_INDEX in ds.column_names:
        raise DataError(_shifted_columns_message(ds, spec, fmt, where))
    if fmt in ("csv", "tsv") and (label := spec.label_column or data.label_column) in ds.column_names:
        ds = _integer_labels(ds, label)
    return ds


def _integer_labels(ds, column: str):
    """A csv/tsv label column read as text: integers where every cell spells one (0, 1, 1.0: class indices, as the
    file's numbers were), else the text as written ("01", "02": codes, not the indices 1 and 2). An empty cell is None."""
    if (cells := _class_indices(ds[column])) is None:
        return ds
    order = ds.column_names  # (add_column puts it last: messages listing the columns showed them reordered)
    return ds.remove_columns(column).add_column(column, cells).select_columns(order)


def _class_indices(values) -> list | None:
    """A label column's cells as class indices where every non-empty one spells an integer (1, "1", 1.0: one class; an
    empty cell None), else None: names, or codes such as "01" (read as written)."""
    if all(_blank(v) for v in values) or not all(_blank(v) or class_index(v) is not None for v in values):
        return None
    return [None if _blank(v) else class_index(v) for v in values]


def _json_problem(path: Path) -> str | None:
    """Where a JSON file that datasets could not parse goes wrong, as Python's json reads it: 'line N: what' (JSON lines,
    each line on its own; a JSON array as one document), or None where it reads fine (another cause)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    documents = [(1, text)] if text.lstrip().startswith("[") else [(i, t) for i, t in enumerate(text.splitlines(), 1) if t.strip()]
    for start, doc in documents:
        try:
            json.loads(doc)
        except json.JSONDecodeError as e:
            return f"line {start + e.lineno - 1}, column {e.colno}: {e.msg}"
    return None


def _decode_error(e: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind a load error: datasets raises its DatasetGenerationError from it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UnicodeDecodeError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _undecodable(path: str | Path) -> UnicodeDecodeError | None:
    """The first bytes of a file that are not UTF-8, if any: pyarrow's JSON reader takes them into its strings, and
    the first read of those rows raised the UnicodeDecodeError from deep in datasets (a cp1252 JSON-lines file). A
    compressed file (data.SPLIT.format=json on x.jsonl.gz, which datasets reads) is checked as decompressed; one of a
    kind Python cannot open is left to datasets. Memoised on the file's version: `header` (validate, and train's own
    checks) and read_split both ask, and each answer reads the whole file."""
    return _undecodable_at(Path(path), file_version(path))


@cache
def _undecodable_at(path: Path, version: tuple, chunk: int = 1 << 20) -> UnicodeDecodeError | None:
    import bz2
    import codecs
    import gzip
    import lzma

    with open(path, "rb") as f:
        magic = f.read(6)
    opener = next((o for m, o in ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open)) if magic.startswith(m)), open)
    if opener is open and magic[:4] in (b"\x28\xb5\x2f\xfd", b"PK\x03\x04", b"\x04\x22\x4d\x18"):  # zstd, zip, lz4
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    with opener(path, "rb") as f:
        try:
            while block := f.read(chunk):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return e
    return None


def _utf16(path: str) -> bool:
    """The file starts with a UTF-16 byte-order mark (Excel's 'Unicode Text' export)."""
    with open(path, "rb") as f:
        return f.read(2) in (b"\xff\xfe", b"\xfe\xff")


def _encoding_message(path: str, e: UnicodeDecodeError | None, where: str) -> str:
    """A file that is not UTF-8: the encoding it most likely is, and how to convert it."""
    if _utf16(path):
        what, source = "UTF-16 (it starts with a UTF-16 byte-order mark, as Excel's 'Unicode Text' writes)", "utf-16"
    else:
        what, source = f"not UTF-8 ({e.reason if e else 'undecodable bytes'}: Windows-1252 or Latin-1, as Excel's plain CSV, most likely)", "cp1252"
    return (f"{where}.path: '{path}' is {what}; it must be UTF-8. Re-encode it, e.g. `iconv -f {source} -t utf-8 '{path}' > OUT` "
            f"(or save it from Excel as 'CSV UTF-8'), and point {where}.path at OUT.")


PHANTOM_INDEX = "__index_level_0__"  # pandas makes the extra leading fields of a too-long first row an index; arrow keeps it
TSV_UNQUOTED = ("TSV files are read unquoted (GLUE-style: quote characters are text), so a tab inside a quoted field splits it. "
                "Save the file as CSV, where quoted fields may hold any character ({where}.format=csv), or remove the tabs inside fields.")


def _shifted_columns_message(ds, spec: SplitConfig, fmt: str, where: str) -> str:
    """A row with more fields than the header shifted every column: say why, for the case at hand."""
    header = [c for c in ds.column_names if c != PHANTOM_INDEX]
    msg = (f"{where}.path: '{spec.path}' has rows with more {fmt.upper()} fields than its header {header}, so the columns "
           f"would be shifted (pandas took the extra leading field as an index, {PHANTOM_INDEX}).")
    if fmt == "tsv" and any("," in c for c in header):
        return msg + (f" The header holds commas: the file looks comma-separated. Read it as CSV: {where}.format=csv "
                      "(or give it a .csv extension).")
    if fmt == "tsv":
        return msg + " " + TSV_UNQUOTED.format(where=where)
    return msg + (" Quote the fields that contain commas (\"a, b\"), or, if the file is tab-separated, set "
                  f"{where}.format=tsv.")


def section(where: str) -> str:
    """The recipe section whose keys (text_columns, label_names, ...) read the split `where`: data.train -> data;
    multitask.tasks.NAME.data.eval -> multitask.tasks.NAME.data; any other split (train.distill.unlabelled) -> data."""
    head, _, split = where.rpartition(".")
    return head if split in ("train", "eval", "test") else "data"


def _check_columns(columns: list[str], needed: list[str], where: str, spec: SplitConfig, unlabelled: bool = False) -> None:
    """Refuse a split without the columns it is read from, naming the keys that choose them: a split of text alone
    (`unlabelled`: train.distill.unlabelled, continued pretraining) is read from its text columns only, so neither the
    label column nor, where one column is all it needs, the delimiter is suspected."""
    missing = [c for c in needed if c not in columns]
    if not missing:
        return
    fold = {str(c).strip().casefold(): c for c in columns}  # 'Sentence', ' label': the header's spelling of a name
    near = {m: fold[k] for m in missing if (k := str(m).strip().casefold()) in fold}
    hint = "".join(f" Did you mean {near[m]!r} (for {m!r})?" for m in near)
    delimited = bool(spec.path) and (spec.path.lower().endswith((".csv", ".tsv")) or spec.format in ("csv", "tsv"))
    other = {sep: fmt for sep, fmt in {",": "csv", "\t": "tsv"}.items() if len(columns) == 1 and sep in columns[0]}
    if len(columns) == 1 and delimited and (len(needed) > 1 or other):  # (a JSON file's one key is no delimiter problem)
        hint += " Only one column was found: is the delimiter right (.tsv is tab-separated, .csv comma-separated)?"
        for sep, fmt in other.items():
            hint += f" Its name holds {sep!r}: the file looks {fmt.upper()}; set {where}.format={fmt}."
    elif delimited and not spec.column_names and not near:  # (a header spelling the names otherwise is a header)
        hint = " If the file has no header row, name its columns with column_names: [...]."
    d = section(where)
    if missing == [spec.references_column]:
        fields = f"{where}.references_column"
    elif unlabelled:  # its own key first where the split is no data.SPLIT (train.distill.unlabelled reads data.text_columns too)
        named = [columns[0]] if len(columns) == len(needed) == 1 else [near.get(m) for m in missing]
        # (a name with spaces is more likely a headerless file's first text than a column to suggest)
        shown = f"=[{', '.join(yaml_scalar(str(c)) for c in named)}]" if all(c and " " not in str(c) for c in named) else ""
        fields = (f"{where}.text_columns{shown}" if d != where.rpartition(".")[0] else
                  f"{d}.text_columns{shown} (or {where}.text_columns)")
        raise DataError(f"{where}: text column(s) {missing} not found; the data has {columns}.{hint} Set {fields}: the "
                        "column(s) holding the text.")
    else:
        fields = f"{d}.text_columns / {d}.label_column / {d}.target_column (or per split)"
    raise DataError(f"{where}: column(s) {missing} not found; the data has {columns}.{hint} Set {fields} to the right names.")


def needed_columns(spec: SplitConfig, data: DataConfig, target_column: str | None = None, unlabelled: bool = False
                   ) -> tuple[list[str], str | None]:
    """-> (the text columns, the label or target column; None for unlabelled text) a split is read from."""
    text_cols = spec.text_columns or data.text_columns
    return text_cols, None if unlabelled else target_column or spec.label_column or data.label_column


def normalize_split(ds, spec: SplitConfig, data: DataConfig, where: str, seed: int, target_column: str | None = None,
                    unlabelled: bool = False, sample: bool = True):
    """-> Dataset with exactly {text, label, row} where label is a raw value after label_map ({text, text_pair, label,
    row} with data.text_pair); with `target_column` (a text target: summarization) {text, target, row} instead (+
    references with the split's references_column), rows with an empty source or target dropped; `unlabelled`
    (continued pretraining) {text} only. row: the row's number in its file, which predictions-*.jsonl name.
    `sample=False`: every row, spec.max_samples left to the caller (load_splits names the classes from the whole file)."""
    text_cols, label_col = needed_columns(spec, data, target_column, unlabelled)
    refs = [spec.references_column] if target_column and spec.references_column else []
    _check_columns(ds.column_names, text_cols if unlabelled else [*text_cols, label_col, *refs], where, spec, unlabelled)
    _check_not_empty(ds, text_cols, where)
    from datasets import ClassLabel, Value

    if not target_column and not unlabelled and type(ds.features[label_col]).__name__ == "Json":
        ds = _scalar_labels(ds, label_col, where)  # JSON lines mixing 1 and "1"
    if not target_column and not unlabelled and not isinstance(shown := ds.features[label_col], (Value, ClassLabel)):
        # a list or a record per row: set() of them was a TypeError in the middle of training's data load
        oriented = (" The file holds one row whose cells are lists: a JSON object of columns (column-oriented)? Write one "
                    "record per row, e.g. JSON lines: {\"sentence\": \"...\", \"label\": \"...\"}.") if len(ds) == 1 else ""
        raise DataError(f"{where}: the label column {label_col!r} holds {shown} values, not one label per row. Give each row a "
                        f"single label value (a name or a class index), or point {section(where)}.label_column (or "
                        f"{where}.label_column) at a column that holds one.{oriented}")
    if not target_column and not unlabelled:
        _check_label_cells(ds, label_col, spec, where)
    _check_text_cells(ds, text_cols, where)

    if target_column and not isinstance(shown := ds.features[label_col], Value):  # a list or a record per row
        raise DataError(f"{where}: the target column {label_col!r} holds {shown} values, not one text "
                        f"per row (several reference summaries?): each would be scored as its printed form. Point "
                        f"{section(where)}.target_column at a column with one summary per row (DialogSum: summary), and "
                        f"an eval or test split's references_column at this one to score against each of them.")
    if not unlabelled:
        ds = ds.add_column("_file_row", range(len(ds)))
    if sample:
        ds = sampled(ds, spec, seed)
    if unlabelled:
        return _as_text(ds.map(lambda b: {"text": joined(b, text_cols)}, batched=True, remove_columns=ds.column_names,
                               desc=f"{where}: columns"))
    # a value is a class index (1, "1") or a name as spelled (a YAML true is the name "True", not a boolean among texts)
    label_map = {spelled(k): i if (i := class_index(v)) is not None else spelled(v) for k, v in (spec.label_map or {}).items()}
    mixed = len({isinstance(v, int) for v in label_map.values()}) > 1
    if label_map and not target_column:
        present = {spelled(v) for v in ds[label_col] if not _blank(v)}
        # values the map leaves as they are must be of the kind it maps to (names, say): a raw 0 beside names was a
        # pyarrow traceback, or read as class index 0 where a whole batch was unmapped
        maps_to = {class_index(v) is not None for v in label_map.values()}  # {True}: class indices, {False}: names
        if unmapped := sorted(v for v in present - set(label_map) if (class_index(v) is not None) not in maps_to):
            raise DataError(f"{where}: label value(s) {unmapped[:10]} of column {label_col!r} are not keys of {where}.label_map "
                            f"({', '.join(map(str, label_map))}), which maps to "
                            f"{'class indices' if class_index(unmapped[0]) is None else 'names'}: add them to the map.")
        unused = [k for k in label_map if k not in present]
        if unused and (spec.max_samples is None or not sample):  # (a subset may miss a rare class)
            log.warning("%s.label_map: key(s) %s not found in column %r (its values: %s): check their spelling.", where,
                        ", ".join(map(repr, unused)), label_col, ", ".join(sorted(present)[:10]))

    def to_rows(batch):
        texts = joined(batch, text_cols[:1] if data.text_pair else text_cols)
        if target_column:
            rows = {"text": texts, "target": [_cell(v).strip() for v in batch[label_col]], "row": batch["_file_row"]}
            if refs:  # several references to score generated text against
                rows["references"] = reference_lists(batch[refs[0]], refs[0], where, batch["_file_row"])
            return rows
        # an empty cell makes pandas read the column as floats (0.0, 1.0, nan): the rest are class indices again
        # (and a name's surrounding spaces are no part of it: " neg" is "neg")
        raw = [int(v) if isinstance(v, float) and v.is_integer() else v.strip() if isinstance(v, str) else v for v in batch[label_col]]
        labels = [label_map.get(spelled(v), v) if label_map else v for v in raw]
        if mixed:  # a map to names and indices ({0: 0, 1: positive}): all as text (a pyarrow traceback); encode_labels
            labels = [spelled(v) for v in labels]  # reads "0" as it read 0: a name first, else an index
        pair = {"text_pair": joined(batch, text_cols[1:])} if data.text_pair else {}  # data.text_pair: encoded as a pair
        return {"text": texts, **pair, "label": labels, "row": batch["_file_row"]}

    ds = _as_text(ds.map(to_rows, batched=True, remove_columns=ds.column_names, desc=f"{where}: columns"))
    if not target_column and getattr(ds.features["label"], "dtype", "").startswith("float"):  # map kept the input's type
        if all(v.is_integer() for v in ds["label"]):
            ds = ds.cast_column("label", Value("int64"))
    # (with data.text_pair, a row whose second text is empty has no pair either)
    if not target_column and (blank := sum(not t.strip() for t in ds["text"]) + sum(not t.strip() for t in ds["text_pair"])
                              if data.text_pair else sum(not t.strip() for t in ds["text"])):
        log.warning("%s: %d %s no text in %s: they are kept, and the model sees only its special tokens for them.", where, blank,
                    "cell(s) have" if data.text_pair else "row(s) have", ", ".join(text_cols))
    if target_column:
        n = len(ds)
        ds = ds.filter(lambda r: bool(r["text"]) and bool(r["target"]), desc=f"{where}: empty rows")
        check_references(ds, where)
        if len(ds) < n:
            log.warning("%s: dropped %d row(s) with an empty source or %s", where, n - len(ds), target_column)
        if len(ds) == 0:
            raise DataError(f"{where}: no row has both a source ({text_cols}) and a target ({target_column}). Check the column names.")
    return ds


def longest_first(ds):
    """`ds` sorted by its rows' "length", longest first (evaluation batches of similar lengths). Quiet: pyarrow >= 25
    warns a FutureWarning on every such sort inside datasets (Python API users saw it at each evaluation; the CLI
    filtered it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
        return ds.sort("length", reverse=True)


def sampled(ds, spec: SplitConfig, seed: int):
    """The split's seeded subset of spec.max_samples rows (the same rows whichever columns it has by then)."""
    if spec.max_samples is not None and spec.max_samples < len(ds):
        return ds.shuffle(seed=seed).select(range(spec.max_samples))
    return ds


def header(spec: SplitConfig, data: DataConfig, where: str) -> tuple[list[str], bool]:
    """-> (the column names of a local split, complete), without reading its rows: the header line (csv/tsv;
    column_names when given) or the schema (parquet), complete; the keys of the first records of a JSON file (JSON
    lines or an array), not complete (a later record may add one). Where the quick read fails, the whole file goes
    through read_split, so a broken file gets training's own message."""
    fmt = _format(spec, where)
    check_header_line(spec, fmt, where)
    if fmt == "json" and (bad := _undecodable(spec.path)) is not None:  # (past the first records' prefix too, as train reads it)
        raise DataError(_encoding_message(spec.path, bad, where))
    if fmt in ("csv", "tsv") and not spec.column_names and not _has_data_row(spec.path, fmt):  # (train refused it, validate passed it)
        raise DataError(f"{where}.path: '{spec.path}' has no rows (a header only?). Point it at a file with data.")
    if spec.column_names and fmt in ("csv", "tsv"):
        return list(spec.column_names), True
    try:
        if fmt in ("csv", "tsv"):
            import pandas as pd

            return [str(c) for c in pd.read_csv(spec.path, nrows=0, sep="\t" if fmt == "tsv" else ",",
                                                 quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL).columns], True
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(spec.path).names), True
        if fmt == "json" and (records := first_json_records(spec.path)) and all(isinstance(r, dict) for r in records):
            return list(dict.fromkeys(k for r in records for k in r)), False
    except Exception:  # (an encoding or parse error): read_split says what is wrong, as training would
        pass
    return read_split(spec, data, where).column_names, True


def _has_data_row(path: str, fmt: str) -> bool:
    """A csv/tsv file holds a row after its header line (blank lines hold none, as pandas skips them); a file without a
    header line either is read_split's to name (empty)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = (cells for cells in delimited_rows(f, fmt) if cells)
        try:
            return next(rows, None) is None or next(rows, None) is not None
        except csv.Error:  # (a cell over the csv module's 128 KiB limit, a long document pandas reads): rows are there
            return True


def first_json_records(path: str, n: int = 100, prefix: int = 1 << 20) -> list:
    """The first `n` records of a JSON-lines file or a JSON array, decoded from its first `prefix` characters only;
    ValueError where they are not JSON."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        text = f.read(prefix)
    decoder, records = json.JSONDecoder(), []
    array = text.lstrip().startswith("[")
    i = text.index("[") + 1 if array else 0
    while len(records) < n:
        while i < len(text) and text[i] in " \t\r\n" + ("," if array else ""):
            i += 1
        if i >= len(text) or array and text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except ValueError:  # a record the prefix cuts: what was decoded so far; anything else is not JSON (read_split says so)
            if len(text) == prefix and (array or "\n" not in text[i:]):
                break
            raise
        records.append(record)
    return records


def same_file(a: SplitConfig | None, b: SplitConfig | None) -> bool:
    """Splits `a` and `b` are read from one local file (a hub split has no path)."""
    return bool(a and b and a.path and b.path and Path(a.path).resolve() == Path(b.path).resolve())


def shared_test_file(d: DataConfig) -> str | None:
    """"eval" or "train" where data section `d`'s test split is read from the file of that split (the selection split's,
    or the training rows'): its figure is then no held-out one, whatever rows a max_samples draws. Said next to it and
    warned about (run.preflight; a multi-task recipe's per task)."""
    return next((split for split in ("eval", "train") if same_file(d.test, getattr(d, split))), None)


def column_problems(recipe: Recipe, prefix: str = "data") -> list[str]:
    """`peftlab validate`: each local split's columns (its header, not its rows) against the columns its task reads, with
    training's own messages, each split named `prefix`.SPLIT. Hub splits (data.dataset) are read by `train`; a missing
    file is the recipe check's problem."""
    task = get_task(recipe.task.type)
    if hasattr(task, "column_problems"):  # several tasks, each with its own data (tasks/multitask.py)
        return task.column_problems(recipe)
    d = recipe.data
    target = d.target_column if task.target_kind == "text" else None
    distill = recipe.train.distill
    splits = [(f"{prefix}.{name}", getattr(d, name), task.target_kind == "none") for name in ("train", "eval", "test")]
    splits += [("train.distill.unlabelled", distill.unlabelled, True)] if distill else []
    problems = []
    for where, spec, unlabelled in splits:
        if spec is not None and spec.path is None and spec.split is not None and d.dataset:
            log.info("%s: the columns of %s split %r are not checked here (`train` reads hub splits)", where, d.dataset, spec.split)
        if spec is None or spec.path is None or not Path(spec.path).is_file():
            continue
        refs = [spec.references_column] if spec.references_column else []
        if hasattr(task, "check_columns"):  # a task that reads its rows itself (sft: conversations)
            def check(columns, where=where, spec=spec, refs=refs):
                task.check_columns(columns, recipe=recipe, where=where)
                _check_columns(columns, refs, where, spec)
        else:
            text_cols, label_col = needed_columns(spec, d, target, unlabelled)
            check = partial(_check_columns, needed=[*text_cols, *([label_col] if label_col else []), *refs], where=where, spec=spec,
                            unlabelled=label_col is None and not refs)
        try:
            columns, complete = header(spec, d, where)
            try:
                check(columns)
            except DataError:
                if complete:
                    raise
                columns = read_split(spec, d, where).column_names  # a column a later JSON record adds: read them all
                check(columns)
            cells = not hasattr(task, "check_columns")  # (a task reading its rows itself checks them itself: check_rows)
            rows = first_rows(spec, where) if refs or cells or hasattr(task, "check_rows") else None  # a JSON file's first records, read once
            if hasattr(task, "check_rows"):
                task.check_rows(rows, columns, recipe=recipe, where=where)
            if refs:
                check_reference_cells(spec, refs[0], where, rows)
            if cells:
                check_json_cells(rows, text_cols, None if target else label_col, where)  # (a target: its own check in train)
        except DataError as e:
            problems.append(str(e))
    return problems


def first_rows(spec: SplitConfig, where: str) -> list[tuple[int, dict]] | None:
    """`validate`: a JSON file's first records, each with its 0-based row number (those that are records); None for
    another format, or a file that is not JSON (header's read_split says so)."""
    if _format(spec, where) != "json":
        return None
    try:
        return [(i, r) for i, r in enumerate(first_json_records(spec.path)) if isinstance(r, dict)]
    except ValueError:
        return None


def check_reference_cells(spec: SplitConfig, column: str, where: str, rows: list[tuple[int, dict]] | None) -> None:
    """`validate`: a references_column holds a list of texts per row, so a csv/tsv file (text cells) cannot give one,
    and a JSON file's first records (`rows`: first_rows) show whether it does (train read 'summary' or 'topic' and
    refused it only then)."""
    fmt = _format(spec, where)
    if fmt in ("csv", "tsv"):
        raise DataError(f"{where}.references_column={column!r}: a {fmt} file holds one text per cell, not a list of texts. "
                        "Give this split as JSON lines with a list of references per row, or remove it (one reference: "
                        "data.target_column).")
    held = [(i, r[column]) for i, r in rows or () if column in r]
    reference_lists([v for _, v in held], column, where, [i for i, _ in held])


def check_json_cells(rows: list[tuple[int, dict]] | None, text_cols: list[str], label_col: str | None, where: str) -> None:
    """`validate`: a list or a record in a text or label cell of a JSON file's first records (`rows`: first_rows),
    refused as training refuses it (validate said nothing, and `train` refused it after loading the model)."""
    for column in [*text_cols, *([label_col] if label_col else [])]:
        if (at := _first_nested([r.get(column) for _, r in rows or ()])) is not None:
            row, record = rows[at]
            raise _nested_cell(where, column, record[column], row, label=column == label_col)


def _nested_cell(where: str, column: str, cell, row: int, label: bool = False) -> DataError:
    """A list or a record where one text or one label belongs: the error naming its row."""
    if label:
        return DataError(f"{where}: the label column {column!r} holds {str(cell)[:80]} in {data_row(row)}, not one label. "
                         "Give each row a single label value (a name or a class index).")
    return DataError(f"{where}: text column {column!r} holds {str(cell)[:80]} in {data_row(row)}, not a text. Give each row "
                     f"one text per column (join the pieces, or put each in a column of its own and list them in "
                     f"{section(where)}.text_columns).")


def joined(batch: dict, columns: list[str]) -> list[str]:
    """The text of each row of a batch: its columns joined with a space."""
    return [" ".join(_cell(v) for v in cells).strip() for cells in zip(*(batch[c] for c in columns))]


def _as_text(ds):
    """The text columns of normalized rows as strings: map gives a returned column its input's type where the values
    fit it, so a text column of numbers ("0", "1": pandas read them as integers) came back as integers."""
    from datasets import Value

    for c in ("text", "text_pair", "target"):
        if c in ds.column_names and ds.features[c] != Value("string"):
            ds = ds.cast_column(c, Value("string"))
    return ds


def _cell(v) -> str:
    """A cell as text: an empty one (None; NaN in a column pandas read as numbers) is "", a 0 is "0" (`str(v or "")`
    made every 0 and 0.0 an empty text, and such rows were dropped or trained on nothing)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _check_not_empty(ds, text_cols: list[str], where: str) -> None:
    """A text column with nothing in it trains a model on empty inputs: refuse, naming the column."""
    for c in text_cols:
        if all(_blank(v) for v in ds[c]):
            raise DataError(f"{where}: text column {c!r} is empty in all {len(ds):,} rows. Point {section(where)}.text_columns (or "
                            f"{where}.text_columns) at the column holding the text; the data has {ds.column_names}.")


def _check_text_cells(ds, text_cols: list[str], where: str) -> None:
    """A list or a record in a text column (a JSON row's "sentence": ["..."]) became its Python repr as the text: refuse,
    naming the first such row."""
    from datasets import Value

    for c in (c for c in text_cols if not isinstance(ds.features[c], Value)):
        if (row := _first_nested(cells := ds[c])) is not None:
            raise _nested_cell(where, c, cells[row], row)


def _first_nested(cells) -> int | None:
    """The first row whose cell is a list or a record (a JSON value where one text or label belongs), if any."""
    return next((i for i, v in enumerate(cells) if isinstance(v, (list, dict))), None)


def _scalar_labels(ds, column: str, where: str):
    """A JSON label column whose cells mix kinds (1 beside "1") comes from `datasets` as Json values. Its cells are read
    as a csv file's would be: integers where every one spells an integer (1 and "1": one class), else text (0 beside
    "positive": the label checks then see both spellings). A list or a record is no label: refused, naming its row."""
    values = list(ds[column])
    if (row := _first_nested(values)) is not None:
        raise _nested_cell(where, column, values[row], row, label=True)
    cells = _class_indices(values)
    return ds.remove_columns(column).add_column(column, cells if cells is not None else [v if v is None else str(v) for v in values])


def _check_label_cells(ds, label_col: str, spec: SplitConfig, where: str) -> None:
    """Empty label cells would become a class of their own ('nan'): name the rows (and their file lines)."""
    empty = [i for i, v in enumerate(ds[label_col]) if _blank(v)]
    if not empty:
        return
    more = " ..." if len(empty) > 10 else ""
    rows = ", ".join(map(str, empty[:10])) + more  # 0-based, as data_row and predictions files count
    starts = row_lines(spec)
    lines = f"; file line {', '.join(str(starts[i]) for i in empty[:10])}{more} of '{spec.path}'" if len(starts) == len(ds) else ""
    raise DataError(f"{where}: {len(empty)} row(s) have an empty {label_col!r} cell: data row {rows} (0-based, as "
                    f"predictions files count{lines}). Fill in their labels or delete those rows.")


def row_lines(spec: SplitConfig) -> list[int]:
    """The file line where each data row of a local csv/tsv/jsonl split starts (a quoted csv cell may span lines; blank
    lines hold no row); [] for other sources. Read only to name rows in an error."""
    if not spec.path:
        return []
    fmt = _format(spec)
    if fmt not in ("csv", "tsv") and not (fmt == "json" and Path(spec.path).suffix.lower() == ".jsonl"):
        return []
    starts = []
    with open(spec.path, encoding="utf-8-sig", errors="replace", newline="") as f:
        if fmt == "json":
            return [n for n, line in enumerate(f, 1) if line.strip()]
        reader, line = delimited_rows(f, fmt), 1
        for cells in reader:
            if cells:  # (an empty line is none; a line of empty cells is a row)
                starts.append(line)
            line = reader.line_num + 1
    return starts if spec.column_names else starts[1:]


def encode_labels(ds, label_names: list[str], where: str, origin: str = "recipe"):
    """Turn raw label values (names, or class indices) into class indices; error on values outside the set. A value
    is looked up as a name first (1, 1.0 and "1" all spell the name "1"). It is read as a class index only when no
    name is spelled as an integer: with label_names [1, 2, 3, 4, 5] (star ratings) the value 1 is the class "1", and a 0
    is refused, where reading it as an index would shift every class by one. `origin`: where the label names come
    from (recipe: data.label_names; train: inferred from the train split; run: a trained run's, which an evaluation
    cannot change), for what the error tells to fix."""
    to_index = label_indexer(label_names)
    raw = ds["label"]
    encoded = [to_index(v) for v in raw]
    bad = sorted({str(v) for v, e in zip(raw, encoded) if e is None})
    if bad:
        n, d = sum(e is None for e in encoded), section(where)
        if origin == "run":
            raise DataError(f"{where}: {n} row(s) have labels the run was not trained on: {bad[:10]} (its labels: {label_names}). "
                            f"An evaluation scores the run's classes: correct those rows in the file, or map their values onto "
                            f"the run's labels with {where}.label_map.")
        if origin == "train":
            raise DataError(f"{where}: {n} row(s) have labels that {d}.train does not have: {bad[:10]} (its labels: "
                            f"{label_names}). Correct those rows, map their values with {where}.label_map, or, if these "
                            f"classes exist, name every class with {d}.label_names=[...].")
        numeric_names = [n for n in label_names if class_index(n) is not None]
        why = (f" Values are read as names here, not as class indices, because {d}.label_names spells {numeric_names[:5]} as "
               "integers." if numeric_names else "")
        raise DataError(f"{where}: {n} row(s) have labels outside the label set "
                        f"{label_names}: {bad[:10]}.{why} Fix {d}.label_names, or map raw values with {where}.label_map.")
    return ds.remove_columns("label").add_column("label", encoded)


def check_unmapped_codes(raw: dict, d, label_names: list[str], prefix: str) -> None:
    """Warn where data.eval or data.test has no label_map of its own, while every label value it holds is a key of
    data.train's label_map that the map sends to another class than the split's rows get: the same raw codes (AG News'
    1..4) named on train and read as class indices there shift or swap every label, and nothing else would say so."""
    train_map = d.train.label_map if d.train is not None else None
    if not train_map:
        return
    to_index = label_indexer(label_names)
    on_train = {spelled(k): to_index(v) for k, v in train_map.items()}
    for name in ("eval", "test"):
        spec = getattr(d, name)
        if name not in raw or spec is None or spec.label_map:
            continue
        present = {spelled(v): v for v in set(raw[name]["label"])}
        if not present or not set(present) <= set(on_train):
            continue
        if moved := [(k, v) for k, v in sorted(present.items()) if on_train[k] != to_index(v)]:
            k, v = moved[0]
            here, there = (repr(label_names[i]) if i is not None else "no class" for i in (to_index(v), on_train[k]))
            flow = [str(x) if isinstance(x, int) else yaml_scalar(str(x)) for pair in train_map.items() for x in pair]
            codes = "{" + ", ".join(f"{a}: {b}" for a, b in zip(flow[::2], flow[1::2])) + "}"
            log.warning("%s.%s has no label_map, and its label values %s are all keys of %s.train.label_map, which names "
                        "them otherwise: %s is read as %s here, as %s on train. If they are the same codes, give %s.%s the same "
                        "map: %s.%s.label_map=%s.", prefix, name, sorted(present)[:10], prefix, k, here, there, prefix, name,
                        prefix, name, codes)


def check_borrowed_order(raw: dict, d, label_names: list[str], prefix: str) -> None:
    """Warn where a distillation student took its teacher's label names (data.label_names null: distill.check) while
    its label values are integer codes: they carry no names, so reading them as positions in the teacher's list is an
    assumption. SST-2's 0/1 under a teacher of [positive, negative] made every label contradict its soft target."""
    teacher = getattr(d, "_label_names_from", None)
    if teacher is None or any(class_index(n) is not None for n in label_names):  # (names spelled as integers: values are names)
        return
    codes = sorted({i for ds in raw.values() for v in set(ds["label"]) if v not in label_names
                    and (i := class_index(v)) is not None and 0 <= i < len(label_names)})
    if codes:
        read, named = codes_as_read(codes, label_names)
        log.warning("%s.label_names is null, so this student takes its teacher's (train.distill.teacher=%s: %s), and its label "
                    "values are integer codes, read as positions in that list: %s. Codes carry no names: that they are in the "
                    "teacher's order is an assumption (run.json's distillation.teacher_agreement says how often the teacher "
                    "agrees with them). Say what each code means with %s.train.label_map (the same on %s.eval/%s.test), "
                    "e.g. %s if %d is %r, or set %s.label_names=%s to confirm the teacher's order.", prefix, teacher,
                    label_names, read, prefix, prefix, prefix, named, codes[0], label_names[codes[0]], prefix,
                    "[" + ", ".join(map(yaml_scalar, label_names)) + "]")


def codes_as_read(codes: list[int], label_names: list[str]) -> tuple[str, str]:
    """Integer codes read as positions in label_names: ('0 -> 'neg', 1 -> 'pos'', the label_map saying so '{0: neg, 1: pos}')."""
    return (", ".join(f"{i} -> {label_names[i]!r}" for i in codes),
            "{" + ", ".join(f"{i}: {yaml_scalar(label_names[i])}" for i in codes) + "}")


def check_codes_beside_names(raw: dict, d, label_names: list[str], prefix: str) -> None:
    """Warn where data.train's labels are names while data.eval's or data.test's are all integer codes (with no
    label_map of their own): the codes are read as positions in label_names, whose order the names never fixed (sorted
    when inferred), so an SST-2-style 1 may become 'negative', silently."""
    if "train" not in raw or any(class_index(n) is not None for n in label_names):  # (names spelled as integers: values are names)
        return
    if not (trained := {spelled(v) for v in set(raw["train"]["label"])}) or not trained <= set(label_names):
        return
    for name in ("eval", "test"):
        spec = getattr(d, name)
        if name not in raw or spec is None or spec.label_map:
            continue
        values = {v for v in set(raw[name]["label"]) if not _blank(v)}
        codes = sorted(i for v in values if spelled(v) not in label_names and (i := class_index(v)) is not None and 0 <= i < len(label_names))
        if not codes or len(codes) < len(values):
            continue
        read, named = codes_as_read(codes, label_names)
        log.warning("%s.%s's labels are integer codes while %s.train's are names: the codes are read as positions in "
                    "%s.label_names %s (%s), an order %s. If a code means another class, give the split a map: "
                    "%s.%s.label_map=%s with the names it means.", prefix, name, prefix, prefix, label_names, read,
                    "you set" if d.label_names else "sorted from train's names", prefix, name, named)


def infer_label_names(ds, where: str = "data.train") -> list[str]:
    """The sorted distinct labels, or 0..K-1 for class indices; refused where that would be a wrong classifier."""
    values = set(ds["label"])
    indices = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not indices:
        values = {spelled(v) for v in values}  # "1" and "1.0": one class
    if len(values) < 2:
        raise DataError(f"{where}: every row has the label {next(iter(values), None)!r}. A classifier needs >= 2 classes (one "
                        "would build a 1-output head and report accuracy 1.0). Use training data with every class, or name "
                        f"all the classes: {section(where)}.label_names=[...].")
    if not indices:
        names = sorted(values)
        check_real_valued(names, where)
        check_label_spellings(names, where)
        return names
    absent = sorted(set(range(max(values) + 1)) - values)
    if absent or min(values) < 0:
        shown, d = sorted(values), section(where)
        example = ", ".join(f"{v}: name{i}" for i, v in enumerate(shown[:3]))
        raise DataError(f"{where}: the integer labels {shown[:10]} are not the class indices 0..{len(values) - 1}: read as "
                        f"indices they make {max(max(values) + 1, len(values))} classes, {len(absent)} of which ({absent[:10]}) "
                        "never occur. If those classes exist but are absent from train, name all of them in order: "
                        f"{d}.label_names=[...] ({max(values) + 1} names). Otherwise map the values to names, e.g. "
                        f"{where}.label_map={{{example}}} (the same on {d}.eval/{d}.test), or set {d}.label_names.")
    return [str(i) for i in range(max(values) + 1)]


REAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def check_real_valued(names: list[str], where: str) -> None:
    """Refuse inferred labels that are all numbers, some not integers (STS-B's similarity scores 0.5, 1.25, 3.8): a
    classifier with a class per distinct score, sorted as text, learns no regression. Integer-valued ones (1.0) are
    classes, spelled "1"."""
    if all(REAL.fullmatch(n) for n in names) and not all(float(n).is_integer() for n in names):  # (codes 01, 02 are classes)
        d = section(where)
        raise DataError(f"{where}: the labels {names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)} distinct) look like a "
                        "regression target (real-valued scores); a classifier needs classes: map them to classes with "
                        f"{where}.label_map (the same on {d}.eval/{d}.test), or bin them in the file (e.g. round each score), "
                        f"or name the classes: {d}.label_names=[...].")


def check_label_spellings(names: list[str], where: str) -> None:
    """Refuse inferred labels that spell one class twice: indices beside names (0/1 and negative/positive), or names
    that differ only in case (positive / Positive; spaces around a label are stripped). Each spelling would become a class of its own."""
    numeric = [n for n in names if n.strip().lstrip("-").isdigit()]
    if numeric and len(numeric) < len(names):
        words = [n for n in names if n not in numeric]
        raise DataError(f"{where}: the labels mix class indices {numeric[:5]} with names {words[:5]}: each spelling would "
                        f"become a class of its own ({len(names)} classes). Map them onto one spelling, e.g. "
                        f"{where}.label_map={{{numeric[0]}: {words[0]}}}, or name the classes: {section(where)}.label_names=[...].")
    spellings: dict[str, list[str]] = {}
    for n in names:  # (spaces around a label are no part of it: spelled() strips them)
        spellings.setdefault(n.casefold(), []).append(n)
    twice = [v for v in spellings.values() if len(v) > 1]
    if twice:  # the map suggested turns every other spelling into the first (the same map on every split reading them)
        fix = ", ".join(f"{yaml_scalar(other)}: {yaml_scalar(first)}" for first, *others in twice for other in others)
        d = section(where)
        raise DataError(f"{where}: the labels {', '.join(map(str, twice[:3]))} differ only in case: each spelling would become a class of its own "
                        f"({len(names)} classes). Fix the data, or map them onto one spelling: {where}.label_map={{{fix}}} "
                        f"(the same on {d}.eval/{d}.test).")


def yaml_scalar(text: str) -> str:
    """`text` as a YAML flow scalar a suggested override can hold: plain where YAML reads it back as this text, else
    quoted (true, True, null, 1.0, a name with ': ' would each be read as something else)."""
    import yaml

    try:
        plain = yaml.safe_load(f"[{text}]") == [text] and text == text.strip()
    except yaml.YAMLError:
        plain = False
    return text if plain else "'" + text.replace("'", "''") + "'"


def load_splits(recipe: Recipe, *, need_train: bool = True, prefix: str = "data", run_labels: bool = False, overlap: bool = True):
    """-> ({split: Dataset of {text, label:int}}, label_names). Splits absent from the recipe are None.
    Tasks with a text target (summarization) get {text, target} rows and no label names. `need_train=False`: an
    evaluation, which reads only the split it scores. `prefix`: the recipe section messages name (a task of a
    multi-task recipe: multitask.tasks.NAME.data). `run_labels`: data.label_names are a trained run's (an evaluation).
    `overlap=False`: no warning about evaluation rows repeating training inputs (select reads train only)."""
    recipe = recipe_argument(recipe, "load_splits")
    d, seed = recipe.data, recipe.data_seed
    task = get_task(recipe.task.type)
    if hasattr(task, "load_splits"):  # several tasks, each with its own data (tasks/multitask.py)
        return task.load_splits(recipe, need_train=need_train)
    if need_train and d.train is None:
        raise DataError(f"{prefix}.train is not set: name the training file, e.g. {prefix}.train.path=train.csv. No split has a default.")
    if need_train and d.eval is not None and d.eval_holdout > 0:
        log.warning("%s.eval_holdout=%s is ignored: %s.eval is set, and evaluation uses it. Set %s.eval=null to evaluate "
                    "on the held-out part of train.", prefix, d.eval_holdout, prefix, prefix)
    target = d.target_column if task.target_kind == "text" else None
    unlabelled = task.target_kind == "none"  # continued pretraining: text only
    own = getattr(task, "normalize_split", None)  # a task that reads its rows itself (sft: conversations)
    classes = not (target or own or unlabelled)
    raw = {}
    for name in ("train", "eval", "test"):
        spec = getattr(d, name)
        if spec is not None:
            ds = read_split(spec, d, f"{prefix}.{name}")
            raw[name] = own(ds, spec, recipe, f"{prefix}.{name}") if own else \
                normalize_split(ds, spec, d, f"{prefix}.{name}", seed, target, unlabelled, sample=not classes)
            if unlabelled and (blank := sum(not t.strip() for t in raw[name]["text"])):  # (packing skipped them without a word)
                log.warning("%s.%s: %d of its %d row(s) have no text in %s: they are skipped (an empty document adds no tokens).",
                            prefix, name, blank, len(raw[name]), ", ".join(needed_columns(spec, d)[0]))
    # labels are named before any max_samples subset or eval_holdout split, from the whole train file: inferred from the
    # rows kept, the classes depended on the seed (a rare one left out was refused as data.eval's, or an integer class
    # missing in the middle refused the file), and so did the size of the head
    if not classes:
        label_names, out = [], dict(raw)
    else:
        label_names = list(d.label_names) if d.label_names else infer_label_names(*next((ds, f"{prefix}.{n}") for n, ds in raw.items()))
        check_unmapped_codes(raw, d, label_names, prefix)
        check_borrowed_order(raw, d, label_names, prefix)
        check_codes_beside_names(raw, d, label_names, prefix)
        raw = {name: sampled(ds, getattr(d, name), seed) for name, ds in raw.items()}
        origin = "run" if run_labels else "recipe" if d.label_names else "train"
        try:
            out = {name: encode_labels(ds, label_names, f"{prefix}.{name}", origin) for name, ds in raw.items()}
        except DataError as e:  # a student's label set is its teacher's (distill.check took it, or checked it equal)
            if recipe.train.distill is None:
                raise
            raise DataError(f"{e} These label names are the teacher's (train.distill.teacher={recipe.train.distill.teacher}): "
                            "a student learns its teacher's classes. Distill from a teacher trained on this data's classes.") from None
    held = "train" in out and "eval" not in out and d.eval_holdout > 0
    if held:
        check_holdout(len(out["train"]), d.eval_holdout, prefix)
        parts = out["train"].train_test_split(test_size=d.eval_holdout, seed=seed)
        out["train"], out["eval"] = parts["train"], parts["test"]
        for part, name in ((out["eval"], "held-out"), (out["train"], "kept")):  # (the file's check saw them together)
            if unlabelled and all(_blank(t) for t in part["text"]):
                raise DataError(f"{prefix}.eval_holdout={d.eval_holdout}: the {len(part):,} {name} rows of {prefix}.train have "
                                f"no text (the file's few rows with text all fell on the other side). Drop the empty rows "
                                f"from the file, or give {prefix}.eval.")
    if label_names:
        trained = set(out["train"]["label"]) if "train" in out else set(range(len(label_names)))
        kept = f" (the part {prefix}.eval_holdout={d.eval_holdout} left to train on)" if held else ""
        if absent := [n for i, n in enumerate(label_names) if i not in trained]:
            log.warning("%s.train%s has no row of class(es) %s (of %s.label_names %s): the model cannot learn to predict "
                        "them. Add training rows of each class%s.", prefix, kept, absent, prefix, label_names,
                        f", or raise {prefix}.train.max_samples (a sample may miss a rare class)" if d.train.max_samples else "")
    if overlap:
        check_overlap(out, d, prefix)
    for name in ("train", "eval", "test"):
        out.setdefault(name, None)
    return out, label_names


def check_overlap(splits: dict, d: DataConfig, prefix: str) -> None:
    """Warn where rows of an evaluation split have the input of a training row (the same text, and pair): their figures
    partly measure what the model memorised (a split made from a file with duplicates, or two files cut from one set).
    A split read from the training file itself is warned about by run.preflight instead."""
    train = splits.get("train")
    if train is None or "text" not in train.column_names:  # (sft reads conversations: its rows are no one text)
        return
    columns = [c for c in ("text", "text_pair") if c in train.column_names]

    def inputs(ds):
        return zip(*(ds[c] for c in columns)) if len(columns) > 1 else ds["text"]

    seen = set(inputs(train)) - {"", ("", "")}  # (rows without text are said elsewhere)
    for name in ("eval", "test"):
        ds = splits.get(name)
        if ds is None or same_file(getattr(d, name), d.train) or not {*columns, "row"} <= set(ds.column_names):
            continue
        rows = [row for x, row in zip(inputs(ds), ds["row"]) if x in seen]
        if rows:
            log.warning("%s.%s: %d of its %d rows (%.1f%%) %s a training row's input (first: %s): its figures partly "
                        "measure memorisation. Drop them from the split (or the training file) for a held-out figure.",
                        prefix, name, len(rows), len(ds), 100 * len(rows) / len(ds), "repeat" if len(rows) > 1 else "repeats",
                        data_row(rows[0]))


def check_holdout(rows: int, fraction: float, prefix: str = "data") -> None:
    """Refuse a held-out split that leaves no training rows; warn about one too small to measure anything."""
    held = math.ceil(rows * fraction)  # as datasets' train_test_split rounds
    if rows < 2:  # (no fraction splits one row; for mlm/clm a row is a whole document)
        raise DataError(f"{prefix}.eval_holdout={fraction}: the training split has {rows} row(s), which no held-out fraction can "
                        f"split. Give an evaluation split instead: {prefix}.eval.path=FILE (and {prefix}.eval_holdout=0), or more training rows.")
    if rows - held < 1:  # (a fraction above (rows - 1) / rows >= 0.5: 0.1 leaves rows to train on)
        raise DataError(f"{prefix}.eval_holdout={fraction} holds out {held} of the {rows} training row(s), leaving none to train "
                        f"on. Lower it (e.g. {prefix}.eval_holdout=0.1), or give an evaluation split: {prefix}.eval.path=FILE.")
    if held < MIN_EVAL_ROWS:
        log.warning("%s.eval_holdout=%s holds out only %d of %d rows: figures on so few rows are mostly noise. Raise it, "
                    "or give an evaluation split: %s.eval.path=FILE.", prefix, fraction, held, rows, prefix)


def report_truncation(ds, where: str, max_length: int) -> None:
    """Say how many rows were cut to max_length; refuse a training split where every row was (the setting is surely
    wrong). An evaluation split of long documents scored on their first max_length tokens is a setup of its own (a
    `peftlab eval` on long sources): said loudly, not refused."""
    cut, d = sum(ds["truncated"]), section(where)
    if cut == len(ds) and not where.endswith(".train"):
        log.warning("%s: all %s rows are longer than %s.max_length=%d tokens: each is scored on its first %d tokens only.",
                    where, f"{len(ds):,}", d, max_length, max_length)
        return
    if cut == len(ds):
        raise DataError(f"{where}: all {len(ds):,} rows are longer than {d}.max_length={max_length} tokens, so every input "
                        f"was truncated. Raise it (e.g. {d}.max_length={max_length * 4}) or check the columns it reads "
                        f"({d}.text_columns; for sft, the conversation columns).")
    level = logging.WARNING if cut > 0.1 * len(ds) else logging.INFO
    log.log(level, "%s: %s rows, %s (%.1f%%) truncated to %s.max_length=%d", where, f"{len(ds):,}", f"{cut:,}",
            100 * cut / len(ds), d, max_length)


def build_data(recipe: Recipe, tokenizer, *, splits=None, label_names=None, prefix: str = "data") -> TaskData:
    """Recipe + tokenizer -> TaskData (tokenized, with a dynamic-padding collator); `prefix` as in load_splits."""
    from transformers import PreTrainedTokenizerBase

    recipe = recipe_argument(recipe, "build_data")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):  # (None: an AttributeError deep in the task's tokenize)
        raise ConfigError([f"build_data(tokenizer={type(tokenizer).__name__} {tokenizer!r:.80}): give the base's tokenizer, the "
                           "second of what build_model returns: model, tokenizer, info = build_model(recipe, ...)."], what="argument")
    if splits is None:
        splits, label_names = load_splits(recipe)
    task = get_task(recipe.task.type)
    if hasattr(task, "build_data"):  # several tasks in one dataset (tasks/multitask.py)
        return task.build_data(recipe, tokenizer, splits, label_names)
    tokenized = {name: task.tokenize(ds, tokenizer, recipe) if ds is not None else None for name, ds in splits.items()}
    for name, ds in tokenized.items():
        if ds is not None:
            report_truncation(ds, f"{prefix}.{name}", recipe.data.max_length)
            if hasattr(task, "report_cuts"):  # sft: answers past the cut, prompts fitted
                task.report_cuts(ds, f"{prefix}.{name}", recipe, training=tokenized["train"] is not None)
            if name == "train" and hasattr(task, "prepare_train"):  # sft: packing (eval and test rows stay whole), and
                tokenized["train"] = task.prepare_train(ds, recipe)  # its refusals before the other splits' are said
    eval_collator = getattr(task, "eval_collator", None)  # optional part of the Task protocol
    return TaskData(train=tokenized["train"], eval=tokenized["eval"], test=tokenized["test"], label_names=label_names,
                    collate=task.collator(tokenizer), eval_collate=eval_collator(tokenizer) if eval_collator else None)
