"""GLUE readers (TSV as distributed, TFDS), featurisation, batching, continuation task."""
import dataclasses
import os

import numpy as np
import pytest

from bert_jax import tasks
from bert_jax.tasks import glue_data as glue

BOM = "\ufeff"


class CharTokenizer:
    """One id per character (offset past the 5 special ids): lengths are easy to predict."""
    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

    def encode(self, text):
        return [5 + (ord(c) % 90) for c in text]


def write(path, lines, bom=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write((BOM if bom else "") + "".join(line + "\n" for line in lines))


def t(*fields):
    return "\t".join(fields)


@pytest.fixture
def glue_dir(tmp_path):
    """A tiny GLUE directory with the real files' layouts and quirks."""
    d = tmp_path / "glue"
    write(d / "CoLA/train.tsv", [t("gj04", "1", "", 'He said "hi".'), t("gj04", "0", "*", "Him went.")])
    write(d / "CoLA/dev.tsv", [t("gj04", "1", "", "It rains.")])
    write(d / "CoLA/test.tsv", [t("index", "sentence"), t("0", "Bill whistled.")])
    write(d / "SST-2/train.tsv", [t("sentence", "label"), t("a fine film ", "1"), t('" bad', "0")])
    write(d / "SST-2/dev.tsv", [t("sentence", "label"), t("ok ", "1")])
    write(d / "SST-2/test.tsv", [t("index", "sentence"), t("0", "meh .")])
    mrpc_header = t("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    write(d / "MRPC/train.tsv", [mrpc_header, t("1", "1", "2", 'He said "yes.', "He agreed."),
                                 t("0", "3", "4", "A cat.", "A dog.")], bom=True)
    write(d / "MRPC/dev.tsv", [mrpc_header, t("1", "5", "6", "Up.", "Rose.")], bom=True)
    write(d / "MRPC/test.tsv", [t("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                t("0", "7", "8", "Down.", "Fell.")])
    sts_cols = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    write(d / "STS-B/train.tsv", [t(*sts_cols, "score"), t("0", "g", "f", "y", "0", "n", "n", "A.", "B.", "5.000")])
    write(d / "STS-B/dev.tsv", [t(*sts_cols, "score"), t("0", "g", "f", "y", "0", "n", "n", "C.", "D.", "0.250")])
    write(d / "STS-B/test.tsv", [t(*sts_cols), t("0", "g", "f", "y", "0", "n", "n", "E.", "F.")])
    write(d / "QQP/train.tsv", [t("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                                t("201359", "1", "2", "How?", "Why?", "0")])
    write(d / "QQP/dev.tsv", [t("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                              t("40", "3", "4", "Who?", "Whom?", "1")])
    write(d / "QQP/test.tsv", [t("id", "question1", "question2"), t("0", "What?", "Which?")])
    parses = ["(a)", "(b)", "(( a))", "(( b))"]
    mnli_train = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                  "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    write(d / "MNLI/train.tsv", [t(*mnli_train, "label1", "gold_label"),
                                 t("0", "1", "1e", "gov", *parses, "P.", "H.", "neutral", "neutral")])
    dev_cols = t(*mnli_train, "label1", "label2", "label3", "label4", "label5", "gold_label")
    for name, premise in (("dev_matched", "Pm."), ("dev_mismatched", "Pmm.")):
        # label1 disagrees with gold_label: the reader must use the gold_label column.
        write(d / f"MNLI/{name}.tsv", [dev_cols, t("0", "1", "1e", "gov", *parses, premise, "H.",
                                                   "neutral", "entailment", "entailment",
                                                   "entailment", "neutral", "entailment")])
    for name in ("test_matched", "test_mismatched"):
        write(d / f"MNLI/{name}.tsv", [t(*mnli_train), t("0", "1", "1e", "gov", *parses, "P.", "H.")])
    write(d / "diagnostic/diagnostic.tsv", [t("index", "sentence1", "sentence2"), t("0", "X.", "Y.")])
    for task, labels in (("QNLI", ("entailment", "not_entailment")), ("RTE", ("not_entailment", "entailment")),
                         ("WNLI", ("0", "1"))):
        cols = ("index", "question", "sentence") if task == "QNLI" else ("index", "sentence1", "sentence2")
        write(d / f"{task}/train.tsv", [t(*cols, "label"), t("0", "A?", "B.", labels[0]), t("1", "C?", "D.", labels[1])])
        write(d / f"{task}/dev.tsv", [t(*cols, "label"), t("0", "E?", "F.", labels[1])])
        write(d / f"{task}/test.tsv", [t(*cols), t("0", "G?", "H.")])
    return d


def test_every_task_reads_with_its_quirks(glue_dir):
    data = {name: glue.load_task(glue.get_task(name), glue_dir=str(glue_dir)) for name in glue.GLUE_TASKS}
    cola = data["cola"]["train"]["train"]
    assert cola.text_a == ['He said "hi".', "Him went."] and cola.labels.tolist() == [1, 0]  # no header
    mrpc = data["mrpc"]["train"]["train"]
    assert mrpc.text_a[0] == 'He said "yes.' and mrpc.labels.tolist() == [1, 0]  # BOM + literal quote
    assert data["sst2"]["train"]["train"].text_a == ["a fine film ", '" bad']
    assert data["stsb"]["dev"]["dev"].labels.dtype == np.float32
    assert data["stsb"]["dev"]["dev"].labels.tolist() == [0.25]
    assert data["qqp"]["train"]["train"].index == ["201359"]
    mnli = data["mnli"]
    assert set(mnli["dev"]) == {"dev_matched", "dev_mismatched"}
    assert mnli["dev"]["dev_mismatched"].text_a == ["Pmm."]
    assert mnli["dev"]["dev_matched"].labels.tolist() == [0]  # gold_label 'entailment', not label1
    assert set(mnli["test"]) == {"MNLI-m", "MNLI-mm", "AX"}
    assert mnli["test"]["AX"].text_b == ["Y."]
    assert data["rte"]["train"]["train"].labels.tolist() == [1, 0]  # entailment=0, not_entailment=1
    assert data["qnli"]["train"]["train"].text_a == ["A?", "C?"]
    for name, splits in data.items():
        for test_name, split in splits["test"].items():
            assert split.labels is None and split.index == ["0"], (name, test_name)
        assert splits["train"]["train"].labels is not None


def test_real_format_samples(shared_data):
    root = shared_data / "glue_format_samples"
    for task_dir in sorted(os.listdir(root)):
        task = glue.get_task(task_dir)
        for stem in ("train", "dev", "test"):
            path = root / task_dir / f"{stem}.tsv"
            if not path.exists():
                continue
            split = glue.read_tsv(str(path), task, labelled=stem != "test")
            data_lines = [x for x in path.read_text(encoding="utf-8-sig").split("\n") if x]
            header = 0 if (task.name == "cola" and stem != "test") else 1
            assert len(split) == len(data_lines) - header, path
            if stem == "test":
                assert split.labels is None
                assert split.index == [str(i) for i in range(len(split))]
            elif task.is_regression:
                assert ((split.labels >= 0) & (split.labels <= 5)).all()
            else:
                assert set(split.labels.tolist()) <= set(range(task.num_labels))
    mrpc = glue.read_tsv(str(root / "MRPC/dev.tsv"), glue.get_task("mrpc"), labelled=True)
    assert mrpc.labels[:2].tolist() == [1, 0]
    assert mrpc.text_b[0].startswith('"The foodservice')  # unbalanced quote kept literally
    cola = glue.read_tsv(str(root / "CoLA/train.tsv"), glue.get_task("cola"), labelled=True)
    assert cola.text_a[0].startswith("Our friends won't buy")
    sts = glue.read_tsv(str(root / "STS-B/train.tsv"), glue.get_task("stsb"), labelled=True)
    assert sts.labels[:2].tolist() == pytest.approx([5.0, 3.8]) and sts.text_b[0] == "An air plane is taking off."


def test_bad_input_messages(glue_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mrcp'"):
        tasks.resolve("rte,mrcp")
    assert tasks.resolve("all") == [("glue", name) for name in glue.GLUE_TASKS]
    assert tasks.resolve("SST-2,ax") == [("glue", "sst2"), ("glue", "mnli")]
    os.remove(glue_dir / "RTE/dev.tsv")
    with pytest.raises(FileNotFoundError, match=r"RTE.*'dev'.*RTE/dev.tsv"):
        glue.load_task(glue.get_task("rte"), glue_dir=str(glue_dir))
    path = glue_dir / "RTE/train.tsv"
    write(path, [t("index", "sentence1", "sentence2", "label"), t("0", "A", "B", "entailment"),
                 t("1", "A", "B\tC", "entailment")])
    with pytest.raises(ValueError, match=r"RTE/train.tsv:3: expected 4 tab-separated columns.*found 5"):
        glue.read_tsv(str(path), glue.get_task("rte"), labelled=True)
    assert len(glue.read_tsv(str(path), glue.get_task("rte"), labelled=True, skip_bad_rows=True)) == 1
    write(path, [t("index", "sentence1", "sentence2", "label"), t("0", "A", "B", "contradiction")])
    with pytest.raises(ValueError, match=r"train.tsv:2: RTE label 'contradiction' is not one of"):
        glue.read_tsv(str(path), glue.get_task("rte"), labelled=True)
    sts = glue_dir / "STS-B/dev.tsv"
    write(sts, [t("index", "g", "f", "y", "o", "s1", "s2", "sentence1", "sentence2", "score"),
                t("0", "g", "f", "y", "0", "n", "n", "C.", "D.", "5.5")])
    with pytest.raises(ValueError, match=r"dev.tsv:2: STS-B score '5.5'"):
        glue.read_tsv(str(sts), glue.get_task("stsb"), labelled=True)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        glue.read_tsv(str(glue_dir / "WNLI/test.tsv"), glue.get_task("wnli"), labelled=True)


def test_tfds_reader_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        mrpc = glue.get_task("mrpc")
        split = glue.load_tfds_split(None, mrpc, "train", labelled=True)
        assert len(split) == 6 and split.text_b is not None
        assert split.labels.dtype == np.int32 and set(split.labels.tolist()) <= {0, 1}
        assert [int(i) for i in split.index] == sorted(int(i) for i in split.index)
        mnli = glue.load_task(glue.get_task("mnli"), use_tfds=True)
        assert set(mnli["dev"]) == {"dev_matched", "dev_mismatched"}
        assert set(mnli["test"]) == {"MNLI-m", "MNLI-mm", "AX"}
        assert all(len(s) == 6 for s in mnli["test"].values())
        stsb = glue.load_tfds_split(None, glue.get_task("stsb"), "validation", labelled=True)
        assert stsb.labels.dtype == np.float32


def test_featurize_truncates_like_google_and_marks_segments():
    split = glue.GlueSplit(["abcdefgh", "ab"], ["xyz", "x"], np.array([1, 0], np.int32), ["0", "1"])
    features = glue.featurize(split, CharTokenizer(), max_seq_length=9)
    first = features.token_ids[0].tolist()
    # 6 text tokens fit: the longer sequence loses tokens first -> a=3, b=3.
    assert first[0] == 2 and first.count(3) == 2 and len(first) == 9
    assert features.first_segment_lengths.tolist() == [5, 4]
    batch = glue.pad_batch(features, [1, 0], 4, glue.bucket_lengths(64), 0, regression=False)
    assert batch["input_ids"].shape == (4, 16)
    assert batch["segment_ids"][0].tolist()[:7] == [0, 0, 0, 0, 1, 1, 0]
    assert batch["input_mask"][0].sum() == 6 and batch["input_mask"][1].sum() == 9
    assert batch["label_ids"].tolist() == [0, 1, 0, 0] and batch["is_real_example"].tolist() == [1, 1, 0, 0]
    single = glue.featurize(glue.GlueSplit(["abcdefghijk"], None, None, ["0"]), CharTokenizer(), 8)
    assert len(single.token_ids[0]) == 8 and single.first_segment_lengths.tolist() == [8]
    assert glue.bucket_lengths(128) == (16, 32, 64, 128)
    assert glue.bucket_lengths(100) == (16, 32, 64, 100)


def test_train_batches_cover_every_example_once_with_few_shapes():
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 120, size=203)]
    labels = np.arange(203, dtype=np.int32)  # label = example number, to trace rows
    features = glue.featurize(glue.GlueSplit(texts, None, labels, [str(i) for i in range(203)]),
                              CharTokenizer(), 128)
    buckets = glue.bucket_lengths(128)
    layout = glue.Layout(buckets, 0)
    batches = list(glue.train_batches(features, 16, layout, seed=3, epoch=0))
    seen = np.concatenate([b["label_ids"][b["is_real_example"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(203))
    assert {b["input_ids"].shape[1] for b in batches} <= set(buckets)
    padded = sum(b["input_ids"].size for b in batches)
    assert padded < 0.75 * len(batches) * 16 * 128  # bucketing beats padding everything to 128
    again = list(glue.train_batches(features, 16, layout, seed=3, epoch=0))
    other_epoch = list(glue.train_batches(features, 16, layout, seed=3, epoch=1))
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(batches, again))
    assert any(a["input_ids"].shape != b["input_ids"].shape or (a["input_ids"] != b["input_ids"]).any()
               for a, b in zip(batches, other_epoch))
    order = np.concatenate([idx for idx, _ in glue.eval_batches(features, 16, layout)])
    assert sorted(order[order >= 0].tolist()) == list(range(203))


def test_packed_batches_hold_every_example_once_in_few_rows():
    rng = np.random.default_rng(1)
    texts = ["x" * int(n) for n in rng.integers(1, 60, size=203)]
    features = glue.featurize(glue.GlueSplit(texts, ["y"] * 203, np.arange(203, dtype=np.int32),
                                             [str(i) for i in range(203)]), CharTokenizer(), 64)
    layout = glue.Layout(glue.bucket_lengths(64), 0, packing=True, row_length=64, max_per_row=4, rows_multiple=2)
    batches = list(glue.train_batches(features, 16, layout, seed=3, epoch=0))
    assert len(batches) == 13 and all(b["input_ids"].shape[0] % 2 == 0 and b["input_ids"].shape[1] == 64
                                      for b in batches)
    ladder = list(glue.train_batches(features, 16, dataclasses.replace(layout, rows_multiple=0), seed=3, epoch=0))
    rows = [b["input_ids"].shape[0] for b in ladder]  # the default: every row count up to 16, none empty
    assert sorted(rows) != sorted(b["input_ids"].shape[0] for b in batches) and all(
        b["is_real_example"][-1].any() for b in ladder)
    seen = np.concatenate([b["label_ids"][b["is_real_example"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(203))
    real = sum(int(b["input_mask"].sum()) for b in batches)
    assert real > 0.8 * sum(b["input_ids"].size for b in batches)  # hardly any padding
    b = batches[0]
    for row in range(b["input_ids"].shape[0]):  # each slot's [CLS] starts a sequence whose positions restart
        for slot in np.flatnonzero(b["is_real_example"][row]):
            start = b["cls_positions"][row, slot]
            assert b["input_ids"][row, start] == CharTokenizer.cls_id and b["position_ids"][row, start] == 0
            assert b["packed_segment_ids"][row, start] == slot + 1
    again = list(glue.train_batches(features, 16, layout, seed=3, epoch=0))
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(batches, again))


def test_packed_row_counts_climb_a_ladder():
    from bert_jax.tasks import batching
    assert [batching.packed_row_count(n) for n in (1, 3, 16, 17, 18, 31, 33, 35, 64, 65)] == \
        [1, 3, 16, 18, 18, 32, 36, 36, 64, 72]
    for n in range(1, 300):  # fewer than an eighth of the rows empty, none up to 16
        assert n <= batching.packed_row_count(n) < n * 8 / 7 and (n > 16 or batching.packed_row_count(n) == n)
    assert len({batching.packed_row_count(n) for n in range(17, 33)}) == 8
    assert [batching.packed_row_count(n, 2) for n in (1, 3, 4)] == [2, 4, 4]
    with pytest.raises(ValueError, match="multiple=-1"):
        batching.packed_row_count(3, -1)


def test_continuation_task_round_trips(tmp_path):
    docs = [[f"doc {d} sentence {i}\twith a tab." for i in range(12)] for d in range(6)]
    counts = glue.write_continuation_task(docs, str(tmp_path / "cont"), seed=1)
    assert sum(counts.values()) == 6 * 11
    data = glue.load_task(glue.get_task("continuation"), glue_dir=str(tmp_path / "cont"))
    train = data["train"]["train"]
    assert len(train) == counts["train"] and 0.3 < train.labels.mean() < 0.7
    for a, b, label in zip(train.text_a, train.text_b, train.labels):
        doc_a, i = a.split()[1], int(a.split()[3])
        true_next = b.split()[1] == doc_a and int(b.split()[3]) == i + 1
        assert true_next == bool(label), (a, b, label)
    assert data["test"]["continuation"].labels is None
    with pytest.raises(ValueError, match="at least two"):
        glue.write_continuation_task([["one.", "two."]], str(tmp_path / "x"))


def test_submission_files_spell_labels_as_glue_expects(tmp_path):
    def split(n):
        return glue.GlueSplit(["x"] * n, ["y"] * n, None, [str(10 + i) for i in range(n)])

    cases = {"mnli": ("AX", [0, 1, 2], ["entailment", "neutral", "contradiction"]),
             "rte": ("RTE", [1, 0], ["not_entailment", "entailment"]),
             "qnli": ("QNLI", [0], ["entailment"]),
             "cola": ("CoLA", [1, 0], ["1", "0"]),
             "stsb": ("STS-B", [5.7, -0.2, 2.25], ["5.000", "0.000", "2.250"])}
    for task_name, (name, predictions, expected) in cases.items():
        path = glue.write_submission(glue.get_task(task_name), name, split(len(predictions)),
                                     np.asarray(predictions), str(tmp_path))
        lines = open(path).read().splitlines()
        assert lines[0] == "index\tprediction" and os.path.basename(path) == f"{name}.tsv"
        assert lines[1:] == [f"{10 + i}\t{label}" for i, label in enumerate(expected)]
    with pytest.raises(ValueError, match="2 predictions for 3 test examples"):
        glue.write_submission(glue.get_task("rte"), "RTE", split(3), np.zeros(2, int), str(tmp_path))


def test_packed_batch_gives_the_unpacked_loss_gradients_and_predictions():
    """The same examples packed (several per row) and padded (one per row): equal loss and
    gradients (dropout off) and the same logits for every example, on the same weights."""
    import jax
    from flax import nnx

    from bert_jax import losses
    from bert_jax.model import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    graphdef, params = nnx.split(BertForSequenceClassification(cfg, 3, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(2)
    texts = ["x" * int(n) for n in rng.integers(1, 30, size=10)]
    split = glue.GlueSplit(texts, ["yz"] * 10, rng.integers(0, 3, 10).astype(np.int32), [str(i) for i in range(10)])
    features = glue.featurize(split, CharTokenizer(), 64)
    padded = glue.Layout(glue.bucket_lengths(64), 0)
    packed = glue.Layout(glue.bucket_lengths(64), 0, packing=True, row_length=64, max_per_row=4)

    @jax.jit
    def loss_and_grads(batch):
        return jax.value_and_grad(lambda p: losses.classification_loss(p, graphdef, batch, None,
                                                                       deterministic=True)[0])(params)

    @jax.jit
    def forward(batch):
        return losses.forward(params, graphdef, batch, None, True)["logits"]

    indices = np.arange(10)
    (loss, grads), (packed_loss, packed_grads) = (
        loss_and_grads(layout.batch(features, indices, 12)[0]) for layout in (padded, packed))
    assert packed.batch(features, indices, 12)[0]["input_ids"].shape[0] < 10  # it did pack
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), packed_grads, grads)

    def logits(layout):
        out = np.zeros((10, 3), np.float32)
        for examples, batch in glue.eval_batches(features, 12, layout):  # the shapes compiled above
            real = examples >= 0
            out[examples[real]] = np.asarray(forward(batch))[real]
        return out
    np.testing.assert_allclose(logits(packed), logits(padded), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit a packed row of 8 tokens"):
        glue.pack_batch(features, indices, 8, 4, 0, regression=False)
    with pytest.raises(ValueError, match="max_examples_per_row=0"):
        glue.pack_batch(features, indices, 64, 0, 0, regression=False)


def test_auto_packed_row_length_follows_the_task_lengths(shared_data):
    """config.packed_row_length=0: on a CPU the row length with the least estimated cost for the
    real training lengths (short tasks get short rows: CoLA's longest example is 47 tokens), always
    holding the longest example; elsewhere, and for long tasks, max_seq_length."""
    import json
    from bert_jax.tasks import batching
    tasks = json.loads((shared_data / "glue_lengths.json").read_text())["tasks"]

    def lengths(task):
        hist = tasks[task]["train"]["tokens_with_special"]
        return np.minimum(np.repeat([int(k) for k in hist], [hist[k] for k in hist]), 128)

    def auto(task, platform="cpu", setting=0):
        n = lengths(task)
        return batching.packed_row_length(setting, 128, n, int(n.max()), 32, 16, platform)
    assert (auto("CoLA"), auto("SST-2"), auto("MRPC"), auto("RTE")) == (48, 80, 128, 128)
    assert auto("CoLA", "tpu") == auto("CoLA", "gpu") == 128
    assert auto("CoLA", setting=64) == 64  # a setting is used as it is
    # 32 examples of 20 tokens: rows of 80 hold 4 with no token empty (8 rows); 64 holds 3 with 4
    # empty, 96 still 4 with 16 empty, 128 six with 8 empty but each token attends over 128 keys.
    assert batching.choose_row_length([20] * 320, 32, 128, 16) == 80
    # The eval sets' longest example (100 tokens) must fit too: rows of 112 hold 11 of these, 128 twelve.
    assert batching.choose_row_length([10] * 64, 32, 128, 16, longest=100) == 112
    with pytest.raises(ValueError, match=r"config.packed_row_length=40: an example of 47 tokens"):
        auto("CoLA", setting=40)
    with pytest.raises(ValueError, match=r"packed_row_length=256: must be 0 \(auto\) or in \[1, max_seq_length=128\]"):
        auto("CoLA", setting=256)
