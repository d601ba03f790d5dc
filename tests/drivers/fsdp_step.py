"""Our model under torch's FSDP2 on gloo, against the same work unsharded (used by tests/test_fsdp.py).

    torchrun --nproc_per_node=2 tests/drivers/fsdp_step.py CHECKPOINT OUT_DIR

Every rank loads CHECKPOINT twice: one copy is sharded with `common.training.fsdp.shard_model` (activation
checkpointing on, as --fsdp trains by default), the other stays whole and plays DDP (its gradients averaged
over the ranks by hand). Rank 0 trains on an example with an image, rank 1 on one without (its forward still
runs the vision tower, so the units' collectives stay matched). Then: one AdamW step on both; an evaluation
by generation of the sharded model (3 examples on 2 ranks, so one rank runs a filler); the full state dict
gathered and written by the Trainer's `_save` (as its FSDP save does), completed by the run folder as a
checkpoint is, plus `finalize_weights`, reloaded into Phi3VForCausalLM; and that state dict loaded back into a
fresh sharded model, as accelerate's resume does. Any check that fails raises; rank 0 writes OUT_DIR/report.json with what was measured.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from common.data.collator import Phi3VCollator  # noqa: E402
from common.evaluation.generation import evaluate  # noqa: E402
from common.model.modeling_phi3v import Phi3VForCausalLM  # noqa: E402
from common.model.official_format import finalize_weights  # noqa: E402
from common.model.processing_phi3v import Phi3VProcessor  # noqa: E402
from common.training.arguments import FinetuneArguments  # noqa: E402
from common.training.fsdp import WRAPPED_LAYERS, full_state_dict, shard_model  # noqa: E402
from common.training.recipe import RecipeTrainer  # noqa: E402

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def conversation(question: str, answer: str, images: list) -> dict:
    tags = "".join(f"<|image_{i + 1}|>" for i in range(len(images)))
    return {"images": images, "messages": [{"role": "user", "content": f"{tags}\n{question}"}, {"role": "assistant", "content": answer}]}


TRAIN = [
    {"id": "image", **conversation("What colour is this?", "red", [Image.new("RGB", (500, 300), (200, 30, 30))])},
    {"id": "text", **conversation("Say yes.", "yes", [])},
]
EVALUATION = [
    {"id": f"eval{i}", "images": [Image.new("RGB", (300 + 40 * i, 300), (30, 60 * i, 90))],
     "messages": [{"role": "user", "content": "<|image_1|>\nWhat is written here?"}], "references": ["x"]}
    for i in range(3)
]


def plain_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def predictions(path: Path) -> list[str]:
    return [record["prediction"] for record in json.loads(path.read_text())["examples"]]


def max_difference(sharded: dict, reference: dict) -> float:
    assert sharded.keys() == reference.keys()
    return max((sharded[name] - reference[name]).abs().max().item() for name in reference)


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node=2"
    report = {}
    processor = Phi3VProcessor.from_pretrained(checkpoint, num_crops=1)
    batch = Phi3VCollator(processor)([TRAIN[rank]])
    reference = Phi3VForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = Phi3VForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    names = list(model.state_dict())
    # Built before sharding, as the Trainer holds the model that accelerate then shards in place.
    args = FinetuneArguments(
        output_dir=str(out / "trainer"), model_name_or_path=str(checkpoint), deepspeed="none", batch_size=2,
        report_to="none", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = RecipeTrainer(model=model, args=args, processing_class=processor)

    shard_model(model, activation_checkpointing=True)
    units = [module for module in model.modules() if isinstance(module, FSDPModule) and module is not model]
    # fully_shard turns a module's class into a subclass named FSDP<class>.
    unit_classes = [{cls.__name__ for cls in type(unit).__mro__} & set(WRAPPED_LAYERS) for unit in units]
    assert set().union(*unit_classes) == set(WRAPPED_LAYERS), f"units {unit_classes}, not of every class in {WRAPPED_LAYERS}"
    layers = [*model.model.layers, *model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers]
    assert all(type(layer).__name__ == "CheckpointWrapper" for layer in layers), "activation checkpointing wraps every layer"
    expected = len(layers)
    assert sum(bool(classes) for classes in unit_classes) == expected, "every layer is its own unit"
    assert isinstance(model, FSDPModule)
    parameters = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in parameters.values()), "every weight is sharded"
    local = sum(p.to_local().numel() for p in parameters.values())
    whole = sum(p.numel() for p in reference.parameters())
    assert local < 0.6 * whole, f"rank {rank} holds {local} of {whole} parameters"
    report.update(units=len(units), wrapped_layers=expected, local_fraction=local / whole)

    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    model.train(), reference.train()
    loss = model(**batch).loss
    loss.backward()
    reference(**batch).loss.backward()
    for p in reference.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    gradients = {plain_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}
    reference_gradients = {n: p.grad for n, p in reference.named_parameters()}
    report["max_gradient_difference"] = max_difference(gradients, reference_gradients)
    optimizer.step(), reference_optimizer.step()
    updated = {plain_name(n): p.full_tensor() for n, p in model.named_parameters()}
    reference_updated = dict(reference.named_parameters())
    report["max_weight_difference"] = max_difference(updated, {n: p.detach() for n, p in reference_updated.items()})
    report["largest_update"] = max_difference({n: p.detach() for n, p in reference_updated.items()}, initial)
    assert report["max_gradient_difference"] < 1e-6, report
    assert report["max_weight_difference"] < 1e-6, report

    # batch_size 1: rank 0 generates twice, rank 1 once plus once for a filler.
    generation = dict(metric="anls", batch_size=1, max_new_tokens=4)
    evaluate(model, processor, EVALUATION, output_file=out / "eval_sharded.json", **generation)

    gathered = full_state_dict(model)
    folder = out / "model"
    trainer._save(str(folder), state_dict=gathered)
    if rank == 0:
        assert list(gathered) == names, "the gathered state dict has the model's own names, in its order"
        assert all(torch.equal(gathered[n], updated[n]) for n in updated), "the gathered weights are the trained ones"
        trainer.run_folder.complete_saved_model(folder, processor.tokenizer)
        finalize_weights(folder, checkpoint)
    else:
        assert gathered == {}, "only rank 0 holds the full state dict"
    dist.barrier()
    reloaded = Phi3VForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if rank == 0:
        state = reloaded.state_dict()
        assert state.keys() == gathered.keys() and all(torch.equal(state[n], gathered[n]) for n in gathered), "reload is exact"
        assert set(load_file(str(folder / "model.safetensors"))) == set(load_file(str(checkpoint / "model.safetensors")))
        config = json.loads((folder / "config.json").read_text())
        # The tiny base holds no code files, so no auto_map entry may point at one.
        assert config["architectures"] == ["Phi3VForCausalLM"] and "auto_map" not in config, config.get("architectures")
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"][0] == 32007
    evaluate(reloaded, processor, EVALUATION, output_file=out / "eval_reloaded.json", **generation)

    fresh = shard_model(Phi3VForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), activation_checkpointing=True)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
    # The call replaces the values of the dict it is given with shards.
    set_model_state_dict(fresh, {name: tensor.clone() for name, tensor in gathered.items()}, options=options)
    restored = full_state_dict(fresh)
    if rank == 0:
        assert all(torch.equal(restored[n], gathered[n]) for n in gathered), "a resumed model holds the saved weights"
        sharded, whole_model = predictions(out / "eval_sharded.json"), predictions(out / "eval_reloaded.json")
        assert sharded == whole_model, (sharded, whole_model)
        report.update(loss=loss.item(), predictions=sharded)
        (out / "report.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
