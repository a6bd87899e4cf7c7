"""Losses on labelled rows only: the same value and gradients as full-vocabulary cross-entropy, and
no [batch, seq, vocab] logits in a training step, an evaluation step or a scoring call."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from PIL import Image

from clot import losses
from clot.families import family_for
from clot.engine import Choice
from clot.tasks import Language, Task
from training import sft


class Pictures:
    """An image store with one picture per name."""

    def open(self, name: str) -> Image.Image:
        return Image.new("RGB", (120 + 40 * len(name), 90), (30 * len(name), 120, 200))


RECORDS = [
    {"id": "a", "image": "ab", "user": "Write a caption for this picture.", "lang": "en",
     "answer": "It is a blue square, and it knows it."},
    {"id": "b", "image": None, "user": "Why was the cat late?", "lang": "en", "answer": "Traffic. Mice."},
    {"id": "c", "image": "abcd", "user": "这张图片有什么好笑的？", "lang": "zh", "answer": "它太方了。"},
]


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)
    targets = family_for(model.config).lora_targets
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # B != 0, so the LoRA weights get gradients of their own
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def batch(engine):
    return sft.Collator(engine.processor, Pictures())(RECORDS)


def labelled_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != losses.IGNORE).sum())


@contextlib.contextmanager
def vocabulary_rows(head):
    """Rows of every full-vocabulary output of `head` (a passed-through call returns hidden states)."""
    rows = []
    handle = head.register_forward_hook(
        lambda module, args, output: rows.append(math.prod(output.shape[:-1]))
        if output.shape[-1] == head.out_features else None)
    try:
        yield rows
    finally:
        handle.remove()


def trainable_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("num_items", [None, 50])
def test_loss_and_gradients_equal_full_logits_cross_entropy(lora_model, batch, num_items):
    """num_items: Trainer's count of labelled tokens over an accumulated batch (here more than this one's)."""
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    full = lora_model(**batch, **extra).loss
    full.backward()
    expected = trainable_grads(lora_model)

    inputs = {key: value for key, value in batch.items() if key != "labels"}
    head = lora_model.get_output_embeddings()
    with losses.head_bypassed(head):
        hidden_states = lora_model(**inputs).logits
    assert hidden_states.shape[-1] == lora_model.config.get_text_config().hidden_size
    mine = losses.causal_lm_loss(hidden_states, head, batch["labels"], extra.get("num_items_in_batch"))
    mine.backward()
    assert mine.item() == pytest.approx(full.item(), abs=1e-5)
    got = trainable_grads(lora_model)
    assert len(got) > 4
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name
    assert "forward" not in head.__dict__  # the head is itself again


def test_log_probs_are_zero_where_unlabelled_and_sum_per_sequence(lora_model, batch):
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = lora_model(**inputs).logits
        head = lora_model.get_output_embeddings()
        with losses.head_bypassed(head):
            hidden_states = lora_model(**inputs).logits
        log_probs = losses.label_log_probs(hidden_states, head, batch["labels"])
    labelled = batch["labels"][:, 1:] != losses.IGNORE
    assert log_probs.shape == labelled.shape and (log_probs[~labelled] == 0).all() and (log_probs[labelled] < 0).all()
    expected = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(log_probs.sum(-1), (expected * labelled).sum(-1), atol=1e-4)


def make_trainer(model, tmp_path, cls=sft.LabelledRowsTrainer, accumulation: int = 2):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=3,
                             gradient_accumulation_steps=accumulation, remove_unused_columns=False,
                             label_names=["labels"])
    trainer = cls(model=model, args=args, data_collator=lambda records: records[0])
    trainer.current_gradient_accumulation_steps = accumulation  # what the training loop sets
    return trainer


@pytest.mark.parametrize("accepts_loss_kwargs", [False, True])
def test_training_step_runs_the_head_on_labelled_rows_only_with_trainers_loss(lora_model, batch, tmp_path,
                                                                              accepts_loss_kwargs):
    """Qwen2.5-VL declares accepts_loss_kwargs = False (a per-batch mean, divided by the accumulation
    steps); a model that accepts them is normalised by the accumulated batch's labelled tokens."""
    from transformers import Trainer

    num_items = torch.tensor(labelled_tokens(batch["labels"]) * 2)  # as if two micro-batches were accumulated
    plain = make_trainer(lora_model, tmp_path, Trainer)
    plain.model_accepts_loss_kwargs = accepts_loss_kwargs
    expected_loss = plain.training_step(lora_model, dict(batch), num_items)
    expected = trainable_grads(lora_model)

    trainer = make_trainer(lora_model, tmp_path)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    with vocabulary_rows(lora_model.get_output_embeddings()) as rows:
        loss = trainer.training_step(lora_model, dict(batch), num_items)
    assert rows == [labelled_tokens(batch["labels"])]
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
    got = trainable_grads(lora_model)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name


def test_evaluation_step_runs_the_head_on_labelled_rows_only(lora_model, batch, tmp_path):
    with torch.no_grad():
        expected = lora_model(**batch).loss.item()
    trainer = make_trainer(lora_model, tmp_path)
    trainer.eval_dataset = [batch]
    with vocabulary_rows(lora_model.get_output_embeddings()) as rows:
        assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert rows == [labelled_tokens(batch["labels"])]


@pytest.mark.parametrize("shared_prefill", [True, False])
def test_scoring_runs_the_head_once_per_question(engine, shared_prefill, monkeypatch):
    picture = Pictures().open("abc")
    choices = [Choice("select", Task.I2T, Language.EN, ["a hat", "a cat", "a bat"], picture),
               Choice("select", Task.T2T, Language.EN, ["yes", "no"], question="Why?"),
               Choice("rank", Task.I2T, Language.EN, ["one", "two", "three", "four"], picture)]
    monkeypatch.setattr(engine, "shared_prefill", shared_prefill)
    monkeypatch.setattr(engine, "min_shared_prefix", 4)
    engine.prefixes.clear()
    with vocabulary_rows(engine.model.get_output_embeddings()) as rows:
        scores = engine.score(choices)
    assert bool(engine.prefixes.entries) == shared_prefill  # the shared path continues from stored prefixes
    assert rows == [2, 1]  # one pass per kind of question (the selections, then the ranking), a row each
    assert [len(s) for s in scores] == [3, 2, 4] and all(sum(s) == pytest.approx(1.0) for s in scores)
