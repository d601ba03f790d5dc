"""Batched evaluation: left-padding equivalence on the tiny model, exact scoring and the distributed split."""

import json
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from common import Phi3VForCausalLM
from common.data.collator import LoadingError
from common.evaluation import generation as evaluation
from common.evaluation.generation import evaluate, stop_token_ids
from common.evaluation.metrics import SCORERS
from common.model.processing_phi3v import Phi3VProcessor

QUESTION = re.compile(r"Question (\d+)\?")
# Known answers and the exact per-example scores they earn; "1,234" vs "1234" and "blue" vs "blue sky"
# sit on either side of ANLS's 0.5 threshold (0.2 and exactly 0.5 normalised distance).
ANSWERS = ["Paris", "yes.", "1,234", "42", "blue"]
REFERENCES = [["paris"], ["yes"], ["1234"], ["41", "42"], ["blue sky"]]
EXPECTED = {"accuracy": [1.0, 1.0, 0.0, 1.0, 0.0], "anls": [0.8, 1.0, 0.8, 1.0, 0.0]}


def make_example(k: int, num_images: int, references=("unused",)) -> dict:
    """Example k: its question names k (the scripted model keys on it); lengths vary so batches need padding."""
    images = [Image.new("RGB", (100, 80), (40 * k % 256, 30 * j, 200)) for j in range(num_images)]
    tags = "".join(f"<|image_{j + 1}|>" for j in range(num_images))
    content = f"{tags}\nQuestion {k}? " + "Answer briefly. " * (k % 3)
    messages = [{"role": "user", "content": content}]
    return {"id": f"ex-{k}", "images": images, "messages": messages, "references": list(references)}


class LazyExamples:
    """Builds example k only when indexed, like a dataset that decodes images on access; records what was read."""

    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        self.read.append(k)
        # Even examples carry an image, odd ones none, so the ranks' batches differ in kind too.
        return make_example(k, (k + 1) % 2, [f"answer {k}"])


class ScriptedModel(Phi3VForCausalLM):
    """The tiny model whose generate answers ``answers[k]`` to "Question k?" and records each call."""

    def script(self, tokenizer, answers):
        self.script_tokenizer, self.answers, self.calls = tokenizer, answers, []
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(),
                           "rows": len(input_ids), **kwargs})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.script_tokenizer.decode(ids[mask.bool() & (ids >= 0)])
            k = int(QUESTION.search(prompt).group(1))
            answer_ids = self.script_tokenizer(self.answers[k], add_special_tokens=False).input_ids
            rows.append(answer_ids + [kwargs["eos_token_id"][-1]])
        # Finished rows are padded after their stop token, as generate does.
        new_tokens = torch.full((len(rows), max(map(len, rows))), kwargs["pad_token_id"])
        for row, tokens in enumerate(rows):
            new_tokens[row, : len(tokens)] = torch.tensor(tokens)
        return torch.cat([input_ids, new_tokens], dim=1)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture
def scripted(tiny_checkpoint, processor):
    return ScriptedModel.from_pretrained(tiny_checkpoint).script(processor.tokenizer, dict(enumerate(ANSWERS)))


# Batches of 2 mix 1 and 2 images, then two text-only prompts, then a last single example.
IMAGE_COUNTS = [1, 2, 0, 0, 1]


def test_batched_predictions_equal_one_at_a_time_and_score_is_the_mean(model, processor, tmp_path):
    examples = [make_example(k, n) for k, n in enumerate(IMAGE_COUNTS)]
    evaluate(model, processor, examples, "anls", tmp_path / "bs1.json", batch_size=1, max_new_tokens=6)
    alone = [r["prediction"] for r in json.loads((tmp_path / "bs1.json").read_text())["examples"]]
    assert all(alone)
    # Near misses (a quarter cut off) and unrelated references, so the mean is over scores strictly between 0 and 1.
    for k, example in enumerate(examples):
        example["references"] = [alone[k][: len(alone[k]) * 3 // 4]] if k % 2 == 0 else ["nothing alike"]

    summary = evaluate(model, processor, examples, "anls", tmp_path / "bs2.json", batch_size=2,
                       max_new_tokens=6)
    written = json.loads((tmp_path / "bs2.json").read_text())
    records = written["examples"]
    assert [r["index"] for r in records] == list(range(5))
    assert [r["id"] for r in records] == [f"ex-{k}" for k in range(5)]
    assert [r["prediction"] for r in records] == alone
    scores = [SCORERS["anls"](r["prediction"], example["references"]) for r, example in zip(records, examples)]
    assert [r["score"] for r in records] == scores
    assert all(0 < s < 1 for s in scores[::2]) and scores[1::2] == [0.0, 0.0]
    assert summary == {"metric": "anls", "score": sum(scores) / 5, "num_examples": 5, "num_skipped": 0}
    assert {k: written[k] for k in summary} == summary
    assert not model.training
    # Written through a temporary file that os.replace removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bs1.json", "bs2.json"]

    # DataLoader workers preprocessing the next batches during generation change nothing in what is scored.
    prefetched = evaluate(model, processor, examples, "anls", tmp_path / "workers.json", batch_size=2,
                          max_new_tokens=6, num_workers=2)
    assert prefetched == summary
    assert json.loads((tmp_path / "workers.json").read_text())["examples"] == records


def test_an_example_failing_in_a_worker_is_one_line_naming_it(model, processor, tmp_path):
    examples = [make_example(0, 1), {**make_example(1, 0), "references": "not a list"}]
    with pytest.raises(LoadingError) as failed:
        evaluate(model, processor, examples, "anls", tmp_path / "e.json", batch_size=1, num_workers=1)
    assert "\n" not in str(failed.value) and "ex-1" in str(failed.value) and "'references' must be a list" in str(failed.value)


@pytest.mark.parametrize("metric", ["accuracy", "anls"])
def test_known_predictions_score_exactly(scripted, processor, tmp_path, metric):
    examples = [make_example(k, n, references=refs) for k, (n, refs) in enumerate(zip(IMAGE_COUNTS, REFERENCES))]
    scripted.train()
    summary = evaluate(scripted, processor, examples, metric, tmp_path / "out" / "eval.json", batch_size=2)
    records = json.loads((tmp_path / "out" / "eval.json").read_text())["examples"]
    assert [r["prediction"] for r in records] == ANSWERS
    assert [r["references"] for r in records] == REFERENCES
    assert [r["score"] for r in records] == pytest.approx(EXPECTED[metric])
    assert summary["score"] == pytest.approx(sum(EXPECTED[metric]) / 5)
    assert scripted.training, "the model's train mode must come back after evaluation"

    tokenizer = processor.tokenizer
    assert [call["rows"] for call in scripted.calls] == [2, 2, 1]
    for call in scripted.calls:
        assert not call["training"] and not call["grad"]
        assert call["do_sample"] is False and call["use_cache"] is True and call["synced_gpus"] is False
        assert call["eos_token_id"] == stop_token_ids(tokenizer)
        assert call["pad_token_id"] == tokenizer.pad_token_id
    with_images = [("pixel_values" in call, "image_sizes" in call) for call in scripted.calls]
    assert with_images == [(True, True), (False, False), (True, True)]
    assert scripted.calls[0]["pixel_values"].shape[:2] == (3, 2)  # 1 + 2 images, global view + 1 crop each


def test_pixels_take_the_vision_towers_dtype(scripted, processor, tmp_path):
    scripted.model.vision_embed_tokens.to(torch.bfloat16)
    evaluate(scripted, processor, [make_example(0, 1, ["paris"])], "accuracy", tmp_path / "e.json")
    assert scripted.calls[0]["pixel_values"].dtype == torch.bfloat16


def test_peft_wrapped_model_generates_like_the_base(model, processor, tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    examples = [make_example(k, n) for k, n in enumerate([1, 0])]
    base = evaluate(model, processor, examples, "accuracy", tmp_path / "base.json", max_new_tokens=4)
    # Fresh LoRA adapters start with B = 0, so the wrapped model must answer exactly as the base one.
    wrapped = peft.get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_checkpoint),
                                  peft.LoraConfig(r=4, target_modules=["qkv_proj", "fc1"]))
    wrapped.train()
    lora = evaluate(wrapped, processor, examples, "accuracy", tmp_path / "lora.json", max_new_tokens=4)
    assert lora == base
    predictions = [json.loads((tmp_path / f"{name}.json").read_text())["examples"] for name in ("base", "lora")]
    assert [r["prediction"] for r in predictions[0]] == [r["prediction"] for r in predictions[1]]
    assert wrapped.training


def test_bad_arguments_fail_before_any_work(scripted, processor, tmp_path):
    with pytest.raises(ValueError, match="no evaluation examples"):
        evaluate(scripted, processor, [], "accuracy", tmp_path / "e.json")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        evaluate(scripted, processor, [make_example(0, 0, ["x"])], "bleu", tmp_path / "e.json")
    assert scripted.calls == [] and not any(tmp_path.iterdir())


def test_stop_tokens_come_from_the_tokenizer(processor):
    tokenizer = processor.tokenizer
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>", "</s>")] == [32007, 32000, 2]


def _distributed_worker(rank, port, checkpoint, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        processor = Phi3VProcessor.from_pretrained(checkpoint, num_crops=1)
        model = ScriptedModel.from_pretrained(checkpoint)
        answers = {k: f"answer {k}" for k in range(7)}
        result = {}
        for name, n, batch_size, zero3 in [("seven", 7, 2, False), ("one", 1, 2, False), ("zero3", 3, 1, True)]:
            examples = LazyExamples(n)
            model.script(processor.tokenizer, answers)
            # Under ZeRO-3 only the number of generate calls and synced_gpus change; GatheredParameters leaves
            # plain (non-ZeRO) parameters alone, so the path runs here with the real deepspeed context.
            evaluation.is_deepspeed_zero3_enabled = (lambda: True) if zero3 else (lambda: False)
            summary = evaluate(model, processor, examples, "accuracy", f"{out_dir}/{name}.json", batch_size=batch_size)
            result[name] = {
                "summary": summary,
                "read": examples.read,
                "calls": len(model.calls),
                "synced": [call["synced_gpus"] for call in model.calls],
            }
        try:
            evaluate(model, processor, LazyExamples(0), "accuracy", f"{out_dir}/none.json")
        except ValueError as err:
            result["none"] = str(err)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_split_and_gather_every_example_once(tiny_checkpoint, tmp_path):
    args = (free_port(), str(tiny_checkpoint), str(tmp_path))
    context = mp.spawn(_distributed_worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two evaluation ranks did not finish within 120 s (a collective is waiting)")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for name, n in [("seven", 7), ("one", 1), ("zero3", 3)]:
        written = json.loads((tmp_path / f"{name}.json").read_text())
        assert [r["index"] for r in written["examples"]] == list(range(n))
        assert [r["prediction"] for r in written["examples"]] == [f"answer {k}" for k in range(n)]
        assert written["score"] == 1.0 and written["num_examples"] == n
        expected = {"metric": "accuracy", "score": 1.0, "num_examples": n, "num_skipped": 0}
        assert ranks[0][name]["summary"] == ranks[1][name]["summary"] == expected

    # Each rank reads only its own shard: r, r + 2, r + 4, ...
    assert ranks[0]["seven"]["read"] == [0, 2, 4, 6] and ranks[1]["seven"]["read"] == [1, 3, 5]
    assert ranks[0]["one"]["read"] == [0] and ranks[1]["one"]["read"] == []
    assert (ranks[0]["one"]["calls"], ranks[1]["one"]["calls"]) == (1, 0)
    # ZeRO-3: shards of 2 and 1 examples make 2 synced generate calls on each rank; rank 1 refills with example 0.
    assert ranks[0]["zero3"]["calls"] == ranks[1]["zero3"]["calls"] == 2
    assert ranks[0]["zero3"]["synced"] == ranks[1]["zero3"]["synced"] == [True, True]
    assert ranks[1]["zero3"]["read"] == [1, 0]
    assert ranks[0]["none"] == ranks[1]["none"] == "no evaluation examples"
