"""The student: layer selection, pooling, freeze masks per train mode, output contract, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from mtd.models.student import (
    Student,
    StudentError,
    encode,
    keep_layers,
    load_student,
    mean_pool,
    save_student,
    set_trainable,
    tokenize,
)

HEADS = {"fc1": 12, "fc16": 4}
TEXTS = ["kalo minu resa", "ti", "vozepo dafi guhe kalo minu resa tivo zepo", "sa sa sa sa", "da"]


def tiny_bert(layers: int = 3, vocab: int = 60, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config)  # with its [CLS] pooler, which mean pooling never uses


def tiny_student(vocab: int = 60, seed: int = 0) -> Student:
    student = Student(tiny_bert(vocab=vocab, seed=seed), HEADS)
    torch.manual_seed(seed + 1)
    for head in student.heads.values():  # reset: the heads get their own deterministic init
        head.reset_parameters()
    return student


def random_batch(batch: int = 6, length: int = 9, vocab: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = torch.tensor([length, 1, 4, length - 1, 2, 6][:batch])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask  # padded positions hold token 0 ([PAD])


# ---------------------------------------------------------------------------------------------
# keep_layers


def test_keep_layers_keeps_chosen_layers_in_order():
    model = tiny_bert(layers=3)
    originals = [{k: v.clone() for k, v in block.state_dict().items()} for block in model.encoder.layer]
    keep_layers(model, [0, 2])
    assert model.config.num_hidden_layers == 2
    assert len(model.encoder.layer) == 2
    for block, source in zip(model.encoder.layer, [0, 2], strict=True):
        state = block.state_dict()
        assert state.keys() == originals[source].keys()
        for k, v in state.items():
            assert torch.equal(v, originals[source][k]), (source, k)
    # Layer 1's weights are gone: layer 2 now sits at position 1.
    dense = "attention.self.query.weight"
    assert not torch.equal(model.encoder.layer[1].state_dict()[dense], originals[1][dense])
    # The pruned model still runs, on exactly the kept blocks.
    ids, mask = random_batch()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (6, 9, 16) and torch.isfinite(out).all()


def test_keep_layers_reorders():
    model = tiny_bert(layers=3)
    q = [b.attention.self.query.weight.clone() for b in model.encoder.layer]
    keep_layers(model, [2, 0])
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight, q[2])
    assert torch.equal(model.encoder.layer[1].attention.self.query.weight, q[0])


@pytest.mark.parametrize("layers", [[3], [-1], [], [0, 0], [0, 5]])
def test_keep_layers_rejects_bad_indices(layers):
    model = tiny_bert(layers=3)
    with pytest.raises(StudentError, match="student.layers"):
        keep_layers(model, layers)
    assert model.config.num_hidden_layers == 3 and len(model.encoder.layer) == 3  # untouched


# ---------------------------------------------------------------------------------------------
# mean_pool


def test_mean_pool_matches_loop_with_padding():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 7, 5, generator=g)
    lengths = [7, 1, 3, 5]
    mask = torch.zeros(4, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    hidden_padded = hidden.clone()
    hidden_padded[mask == 0] = 1e3  # garbage in padded positions must not leak into the mean
    expected = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
    got = mean_pool(hidden_padded, mask)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_mean_pool_empty_row_is_finite():
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    got = mean_pool(hidden, mask)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# Freeze masks: one optimizer step changes exactly the parameters a train mode trains


def _changed_after_one_step(student: Student, mode: str, heads: list[str]) -> set[str]:
    trainable = set(set_trainable(student, mode, heads))
    assert trainable == {n for n, p in student.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    # Every parameter is handed to the optimizer (no weight decay): only a gradient can move one,
    # so what moves is decided by the freeze mask alone.
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    ids, mask = random_batch()
    outputs = student(input_ids=ids, attention_mask=mask)
    loss = sum((v ** 2).sum() for v in outputs.values())  # every head's output feeds the loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable, (mode, sorted(changed ^ trainable))
    return changed


def test_train_heads_only_named_heads():
    student = tiny_student()
    changed = _changed_after_one_step(student, "heads", ["fc1"])
    assert changed == {"heads.fc1.weight", "heads.fc1.bias"}


def test_train_last_layer_and_named_heads():
    student = tiny_student()
    changed = _changed_after_one_step(student, "last:1", ["fc1"])
    last = {f"encoder.{n}" for n, _ in student.encoder.named_parameters() if n.startswith("encoder.layer.2.")}
    assert last and changed == {"heads.fc1.weight", "heads.fc1.bias"} | last
    assert not any(n.startswith("heads.fc16") for n in changed)
    assert not any(".layer.0." in n or ".layer.1." in n or "embeddings" in n for n in changed)


def test_train_last_two_layers():
    student = tiny_student()
    changed = _changed_after_one_step(student, "last:2", ["fc16"])
    layers = {n.split(".")[3] for n in changed if n.startswith("encoder.encoder.layer.")}
    assert layers == {"1", "2"}
    assert {"heads.fc16.weight", "heads.fc16.bias"} <= changed
    assert not any(n.startswith("heads.fc1.") for n in changed)


def test_train_all_everything_but_pooler():
    student = tiny_student()
    changed = _changed_after_one_step(student, "all", ["fc1", "fc16"])
    everything = {n for n, _ in student.named_parameters()}
    pooler = {n for n in everything if ".pooler." in n}
    assert pooler, "the tiny BERT should have a pooler to check"
    assert changed == everything - pooler


def test_train_all_leaves_unnamed_head_frozen():
    student = tiny_student()
    changed = _changed_after_one_step(student, "all", ["fc16"])
    assert not any(n.startswith("heads.fc1.") for n in changed)
    assert "encoder.embeddings.word_embeddings.weight" in changed


def test_set_trainable_refreezes_between_stages():
    student = tiny_student()
    set_trainable(student, "all", ["fc1", "fc16"])
    names = set(set_trainable(student, "heads", ["fc16"]))
    assert names == {"heads.fc16.weight", "heads.fc16.bias"}


@pytest.mark.parametrize("mode", ["last:0", "last:4", "everything", "first:1"])
def test_set_trainable_rejects_bad_modes(mode):
    with pytest.raises(StudentError):
        set_trainable(tiny_student(), mode, ["fc1"])


# ---------------------------------------------------------------------------------------------
# Output contract


def test_head_outputs_shape_finite_and_gradients_reach_trainable_params():
    student = tiny_student()
    set_trainable(student, "all", list(HEADS))
    ids, mask = random_batch()
    outputs = student(input_ids=ids, attention_mask=mask)
    assert set(outputs) == set(HEADS)
    for name, dim in HEADS.items():
        assert outputs[name].shape == (6, dim)
        assert outputs[name].dtype == torch.float32
        assert torch.isfinite(outputs[name]).all()
    # Each head depends on its own weights only, and on every row's real tokens only.
    sum(o.sum() for o in outputs.values()).backward()
    for n, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"no gradient reaches {n}"
        else:
            assert p.grad is None, n


def test_outputs_ignore_padding():
    student = tiny_student().eval()
    ids, mask = random_batch()
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask)
        ids2 = ids.clone()
        ids2[mask == 0] = 7  # change only padded positions
        other = student(input_ids=ids2, attention_mask=mask)
        # Row 1 alone, unpadded, gives the same vector as inside the padded batch.
        single = student(input_ids=ids[1:2, :1], attention_mask=mask[1:2, :1])
    for h in HEADS:
        torch.testing.assert_close(full[h], other[h], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full[h][1:2], single[h], rtol=1e-5, atol=1e-6)


def test_head_dims_property():
    assert tiny_student().head_dims == HEADS


# ---------------------------------------------------------------------------------------------
# save_student / load_student


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")


def test_save_load_round_trip(tokenizer, tmp_path):
    student = tiny_student(vocab=len(tokenizer), seed=5)
    # Move the weights off their init so a loader that re-initializes anything would show.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_student(student, tokenizer, tmp_path / "s", max_length=12)
    loaded, tok2, max_length = load_student(tmp_path / "s")
    assert max_length == 12
    assert loaded.head_dims == HEADS
    assert isinstance(loaded, Student)
    ref = student.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert torch.equal(tokenize(tok2, TEXTS, 12)["input_ids"], tokenize(tokenizer, TEXTS, 12)["input_ids"])
    for head in HEADS:
        a = encode(student, tokenizer, TEXTS, head, 12, batch_size=2)
        b = encode(loaded, tok2, TEXTS, head, 12, batch_size=3)
        assert a.shape == (len(TEXTS), HEADS[head]) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_encode_order_and_batching_independent(tokenizer):
    student = tiny_student(vocab=len(tokenizer), seed=2)
    a = encode(student, tokenizer, TEXTS, "fc1", 12, batch_size=64)
    b = encode(student, tokenizer, TEXTS[::-1], "fc1", 12, batch_size=1)
    np.testing.assert_allclose(a, b[::-1], atol=1e-5)
    assert student.training  # encode restores the mode it found


def test_load_student_rejects_other_folders(tmp_path):
    with pytest.raises(StudentError, match="student.json"):
        load_student(tmp_path)


@pytest.mark.parametrize("mode, training_layers", [("heads", set()), ("last:1", {2}), ("all", {0, 1, 2})])
def test_frozen_modules_run_in_eval_mode(mode, training_layers):
    """No dropout noise on frozen features: frozen layers (under last:K too) run as at inference."""
    from mtd.models.student import layer_list, set_train_mode

    student = tiny_student()
    set_trainable(student, mode, ["fc1"])
    set_train_mode(student)
    layers = layer_list(student.encoder)
    assert {i for i, layer in enumerate(layers) if layer.training} == training_layers
    for i, layer in enumerate(layers):
        assert all(m.training == (i in training_layers) for m in layer.modules())
    assert student.encoder.embeddings.training == (mode == "all")
    assert student.heads["fc1"].training and not student.heads["fc16"].training


def test_no_weight_decay_on_biases_and_norm_weights():
    from mtd.training.trainer import make_optimizer

    student = tiny_student()
    set_trainable(student, "all", ["fc1"])
    optimizer = make_optimizer(student, 1e-3, 0.01)
    assert optimizer.defaults["fused"]  # one kernel for all tensors (9x faster steps on CPU)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in student.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    flat = {n for n, p in student.named_parameters()
            if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)}
    assert {names[id(p)] for p in no_decay["params"]} == flat
    assert "heads.fc1.weight" in {names[id(p)] for p in decay["params"]}


def test_weight_decay_follows_the_shapes_recorded_before_sharding():
    """FSDP flattens every parameter into a 1-d shard (ZeRO-3 empties them): weight decay must
    still skip exactly the biases and norm weights, as recorded before the wrapping."""
    from mtd.training.trainer import PreparedStudent, make_optimizer

    student = tiny_student()
    set_trainable(student, "all", ["fc1"])
    expected = make_optimizer(student, 1e-3, 0.01).param_groups
    prepared = PreparedStudent(None, student)
    for p in student.parameters():
        p.data = p.data.reshape(-1)  # as FSDP's flat shards
    groups = make_optimizer(student, 1e-3, 0.01, prepared.matrices).param_groups
    for got, want in zip(groups, expected, strict=True):
        assert [id(p) for p in got["params"]] == [id(p) for p in want["params"]]
        assert got["weight_decay"] == want["weight_decay"]
