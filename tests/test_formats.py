"""The custom recipe's data formats (common/data/formats.py): reading, image placement, system turns, evaluation turns,
held-out rows and the warnings, in-process with the tiny tokenizer."""

import hashlib
import json
import logging

import datasets
import pytest
from PIL import Image

from common.data.conversation import IGNORE_INDEX, encode_conversation, encode_prompt
from common.data.formats import (
    ColumnConversations,
    data_warnings,
    detect_format,
    evaluation_examples,
    hold_out,
    prediction_examples,
    read_conversations,
    row_summaries,
    warn_about_data,
)
from common.data.row_store import summary_hashes
from common.errors import DataError
from common.fixtures.synthetic import _shapes_image, llava_rows
from common.fixtures.tiny_tokenizer import build_tiny_tokenizer
from common.model.image_processing_phi3v import Phi3VImageProcessor
from common.model.processing_phi3v import Phi3VProcessor


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=1), tokenizer=build_tiny_tokenizer())


@pytest.fixture
def images(tmp_path):
    import random

    rng = random.Random(0)
    for name, count in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        _shapes_image(rng, count).save(tmp_path / name)
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def image_tokens(processor, path) -> int:
    with Image.open(path) as image:
        return int(processor.image_processor([image.convert("RGB")], num_crops=1)["num_img_tokens"][0])


def text_ids(processor, text):
    # Spec section 5: each text piece between image tags is tokenized on its own, with the default special tokens.
    return processor.tokenizer(text)["input_ids"]


def test_llava_placeholders_mid_text_become_tags_where_they_stand_token_by_token(processor, images):
    path = write_jsonl(images / "train.jsonl", [
        {"id": "x", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "Left: <image> Right: <image>\nWhich has more?"}, {"from": "gpt", "value": "right"}]},
    ])
    (conversation,), found = read_conversations(path, images)
    assert found == "llava"
    assert conversation["messages"][0]["content"] == "Left: <|image_1|> Right: <|image_2|>\nWhich has more?"
    encoded = encode_prompt(processor, evaluation_examples(conversation, "first")[0] | {"images": [Image.open(images / "a.png").convert("RGB"), Image.open(images / "b.png").convert("RGB")]})
    expected = (text_ids(processor, "<|user|>\nLeft: ") + [-1] * image_tokens(processor, images / "a.png")
                + text_ids(processor, " Right: ") + [-2] * image_tokens(processor, images / "b.png")
                + text_ids(processor, "\nWhich has more?<|end|>\n<|assistant|>\n"))
    assert encoded.input_ids == expected


def test_a_system_turn_reaches_the_phi3_template_and_is_never_a_target(processor, images):
    path = images / "train.json"
    path.write_text(json.dumps([
        {"messages": [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "shape"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "yes"}]},
    ], indent=1))
    (conversation,), found = read_conversations(path, images)
    assert found == "messages" and conversation["id"] == "train.json:2"
    example = {**conversation, "images": [Image.open(images / "a.png").convert("RGB")]}
    encoded = encode_conversation(processor, example)
    answer = processor.tokenizer("shape<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    second_answer = processor.tokenizer("yes<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    first_prompt = (text_ids(processor, "<|system|>\nAnswer with one word.<|end|>\n<|user|>\n")
                    + [-1] * image_tokens(processor, images / "a.png")
                    + text_ids(processor, "\nWhat is it?<|end|>\n<|assistant|>\n"))
    second_prompt = text_ids(processor, "<|user|>\nSure?<|end|>\n<|assistant|>\n")
    assert encoded.input_ids == first_prompt + answer + second_prompt + second_answer
    assert encoded.labels == [IGNORE_INDEX] * len(first_prompt) + answer + [IGNORE_INDEX] * len(second_prompt) + second_answer
    system_id = processor.tokenizer.convert_tokens_to_ids("<|system|>")
    assert encoded.labels[encoded.input_ids.index(system_id)] == IGNORE_INDEX


def test_system_prompt_option_fills_rows_without_one_and_keeps_their_own(images):
    path = write_jsonl(images / "train.jsonl", [
        {"id": "own", "conversations": [{"from": "system", "value": "Mine."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        {"id": "row", "system": "On the row.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        {"id": "none", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    ])
    conversations, _ = read_conversations(path, images, system_prompt="Default.")
    assert [c["messages"][0] for c in conversations] == [
        {"role": "system", "content": "Mine."}, {"role": "system", "content": "On the row."}, {"role": "system", "content": "Default."}]


def test_mixed_rows_images_in_front_without_placeholder_and_text_only(images):
    path = write_jsonl(images / "train.jsonl", [
        {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "Count."}, {"from": "gpt", "value": "1"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"id": "three", "image": ["a.png", "b.png", "c.png"], "conversations": [{"from": "human", "value": "All?"}, {"from": "gpt", "value": "6"}]},
    ])
    conversations, _ = read_conversations(path, images, file_format="llava")
    assert [c["messages"][0]["content"] for c in conversations] == ["<|image_1|>\nCount.", "2+2?", "<|image_1|><|image_2|><|image_3|>\nAll?"]
    assert [len(c["images"]) for c in conversations] == [1, 0, 3]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]},
         "2 <image> placeholder(s) but 1 image(s)"),
        ({"id": "q", "image": "../a.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]}, "outside the image root"),
        ({"id": "r", "conversations": [{"from": "robot", "value": "?"}]}, "\"from\" one of"),
        ({"id": "s", "image": "missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]}, "does not exist"),
    ],
)
def test_bad_llava_rows_name_file_and_line(images, row, message):
    good = {"id": "g", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    path = images / "data" / "train.json"
    path.parent.mkdir()
    (path.parent / "a.png").write_bytes((images / "a.png").read_bytes())
    path.write_text("[\n" + json.dumps(good) + ",\n\n" + json.dumps(row) + "\n]\n")
    with pytest.raises((DataError, FileNotFoundError)) as error:
        read_conversations(path, images / "data")
    text = str(error.value)
    assert text.startswith(f"{path}:4: ") and message in text and "\n" not in text


def test_messages_row_images_fill_parts_and_a_count_that_differs_is_an_error(images):
    path = write_jsonl(images / "train.jsonl", [
        {"images": ["a.png", "b.png"], "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "same"}]}]},
    ])
    (conversation,), _ = read_conversations(path, images)
    assert conversation["messages"][0]["content"] == "Compare <|image_1|>\nwith<|image_2|>"
    assert conversation["messages"][1]["content"] == "same"
    write_jsonl(path, [{"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"train.jsonl:1: the row has 2 \"images\" but its parts"):
        read_conversations(path, images)


def test_format_detection_names_the_format_and_refuses_mixed_files(images, caplog):
    ours = write_jsonl(images / "ours.jsonl", [{"id": "a", "conversations": [{"images": ["a.png"], "user": "?", "assistant": "x"}]}])
    assert detect_format(ours) == "jsonl"
    with caplog.at_level(logging.INFO, logger="common.data.formats"):
        (conversation,), found = read_conversations(ours, images)
    assert found == "jsonl" and "read as jsonl" in caplog.text and conversation["messages"][0]["content"] == "<|image_1|>\n?"
    mixed = write_jsonl(images / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "x"}]},
        {"conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
    ])
    with pytest.raises(DataError, match="rows are in different formats .messages at .*mixed.jsonl:1, llava at .*mixed.jsonl:2"):
        detect_format(mixed)
    unknown = write_jsonl(images / "unknown.jsonl", [{"question": "?", "answer": "x"}])
    with pytest.raises(DataError, match=r"unknown.jsonl:1: the row is in none of the formats"):
        detect_format(unknown)


def test_evaluation_turns_answer_with_the_earlier_turns_as_context():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    conversation = {"id": "c", "images": [], "messages": messages}
    (first,) = evaluation_examples(conversation, "first")
    (last,) = evaluation_examples(conversation, "last")
    every = evaluation_examples(conversation, "all")
    assert first == {"id": "c", "images": [], "messages": messages[:2], "references": ["a1"]}
    assert last == {"id": "c", "images": [], "messages": messages[:4], "references": ["a2"]}
    assert [e["id"] for e in every] == ["c#1", "c#2"] and [e["references"] for e in every] == [["a1"], ["a2"]]


def test_context_turns_are_encoded_as_in_training(processor):
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    prompt = encode_prompt(processor, {"images": [], "messages": messages})
    trained = encode_conversation(processor, {"images": [], "messages": messages + [{"role": "assistant", "content": "a2"}]})
    answer = processor.tokenizer("a2<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert prompt.input_ids + answer == trained.input_ids


def test_a_save_to_disk_dataset_with_column_options(tmp_path):
    import random

    rng = random.Random(1)
    rows = [{"pictures": [_shapes_image(rng, 1), _shapes_image(rng, 2)], "dialogue": [
        {"role": "user", "content": "<image><image>Which?"}, {"role": "assistant", "content": "second"}]},
            {"pictures": [], "dialogue": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    features = datasets.Features({"pictures": datasets.List(datasets.Image()), "dialogue": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "data"))
    dataset = datasets.load_from_disk(str(tmp_path / "data"))
    convert = ColumnConversations("dialogue", "pictures", None, "Be brief.", "mine")
    convert.check_columns(dataset)
    first = convert(dataset[0], 0)
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}
    assert first["messages"][1]["content"] == "<|image_1|><|image_2|>Which?" and len(first["images"]) == 2
    assert convert(dataset[1], 1)["id"] == "mine[1]"
    with pytest.raises(DataError, match="has no column 'messages'"):
        ColumnConversations("messages", "pictures", None, None, "mine").check_columns(dataset)
    summaries = row_summaries(dataset, "dialogue", "pictures")
    assert [summaries.describe(k)[1] for k in range(2)] == ["second", "Hello"]
    # The first row's images (both, their bytes hashed, nothing decoded) go into what the overlap warning compares.
    pictures = dataset.cast_column("pictures", datasets.List(datasets.Image(decode=False)))[0]["pictures"]
    keys = [hashlib.sha1(picture["bytes"]).hexdigest() for picture in pictures]
    assert len(keys) == 2 and summaries.inputs[0] == summary_hashes(None, keys, "<|image_1|><|image_2|>Which?", "")[1]


def test_hold_out_is_seeded_and_disjoint():
    rows = [{"id": str(i)} for i in range(20)]
    train, held = hold_out(rows, 0.25, seed=3)
    assert len(held) == 5 and {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
    assert hold_out(rows, 0.25, seed=3) == (train, held) and hold_out(rows, 0.25, seed=4)[1] != held
    with pytest.raises(DataError, match="leaves nothing to train on"):
        hold_out(rows[:1], 0.5, seed=0)


def summaries_of(rows):
    return row_summaries(rows)


def conversation(example_id, image, prompt, answer):
    return {"id": example_id, "images": [image] if image else [], "messages": [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("case", ["fewer_rows_than_a_batch", "few_steps", "same_id", "same_images_and_prompt", "constant_answer"])
def test_each_warning_fires_on_its_fixture_and_not_on_good_data(case, caplog):
    train = [conversation(f"t{i}", f"img{i}.png", f"question {i}", f"answer {i % 4}") for i in range(64)]
    held = [conversation(f"e{i}", f"other{i}.png", f"question {i}", f"answer {i % 4}") for i in range(8)]
    batch, max_steps = 4, 0
    expected = {
        "fewer_rows_than_a_batch": "fewer than one global batch",
        "few_steps": "optimizer steps (fewer than 10)",
        "same_id": "evaluation rows are also training rows",
        "same_images_and_prompt": "evaluation rows are also training rows",
        "constant_answer": "have the same answer 'yes'",
    }[case]
    if case == "fewer_rows_than_a_batch":
        batch, max_steps = 128, 20
    elif case == "few_steps":
        max_steps = 5
    elif case == "same_id":
        held[3]["id"] = "t7"
    elif case == "same_images_and_prompt":
        held[2] = conversation("e2", "img9.png", "question 9", "whatever")
    elif case == "constant_answer":
        for row in train[:33]:
            row["messages"][1]["content"] = "yes"
    with caplog.at_level(logging.WARNING, logger="common.data.formats"):
        warn_about_data(train, summaries_of(train), summaries_of(held), batch, max_steps, 1)
    assert len(caplog.records) == 1 and expected in caplog.records[0].getMessage()
    good = [conversation(f"t{i}", f"img{i}.png", f"question {i}", f"answer {i % 4}") for i in range(64)]
    assert data_warnings(64, summaries_of(good), summaries_of([conversation("e0", "o.png", "q", "a")]), 4, 16) == []


def test_predict_examples_of_each_format(images):
    llava = write_jsonl(images / "llava.jsonl", [
        {"id": "l", "image": "a.png", "conversations": [{"from": "human", "value": "A <image> here?"}, {"from": "gpt", "value": "yes"}]}])
    chat = write_jsonl(images / "chat.jsonl", [
        {"id": "m", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}])
    ours = write_jsonl(images / "ours.jsonl", [{"id": "o", "conversations": [{"user": "?"}]}])
    (from_llava,) = prediction_examples(llava, images, system_prompt="S")
    (from_chat,) = prediction_examples(chat, images, system_prompt="S")
    (from_ours,) = prediction_examples(ours, images, system_prompt="S")
    assert from_llava["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "A <|image_1|> here?"}]
    assert from_llava["references"] == ["yes"]
    assert [m["content"] for m in from_chat["messages"]] == ["S", "q1", "a1", "q2"] and from_chat["references"] == []
    assert from_ours["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "?"}] and from_ours["references"] == []


def test_synthetic_llava_rows_read_back(tmp_path):
    rows = llava_rows(tmp_path, n=6)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    conversations, found = read_conversations(path, tmp_path)
    assert found == "llava" and [len(c["images"]) for c in conversations] == [1, 2, 0, 1, 2, 0]


def custom_script():
    import importlib

    return importlib.import_module("finetune_hf_trainer_custom")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_file", "t.json"], "give exactly one of --eval_file, --eval_split and --eval_fraction (got none)"),
        (["--train_file", "t.json", "--dataset_path", "d", "--eval_fraction", "0.1"], "give exactly one of --train_file, --dataset_name"),
        (["--dataset_path", "d", "--eval_fraction", "0.1", "--format", "llava"], "--format is the format of --train_file"),
        (["--train_file", "t.json", "--eval_fraction", "1.5"], "--eval_fraction must be between 0 and 1"),
    ],
)
def test_custom_recipe_refuses_impossible_data_options_at_parse_time(capsys, flags, message):
    from tests.recipe_utils import parse_refusal

    script = custom_script()
    line = parse_refusal(capsys, lambda argv: script.parse_args(script.CustomArguments, argv=argv), [*flags, "--output_dir", "o", "--deepspeed", "none"])
    assert message in line


def test_custom_recipe_stops_on_a_bad_row_before_loading_anything(images, tmp_path, capsys):
    bad = write_jsonl(images / "train.jsonl", [
        {"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]},
        {"id": "b", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "x"}]},
    ])
    with pytest.raises(SystemExit) as stopped:
        custom_script().main(["--train_file", str(bad), "--eval_fraction", "0.5", "--output_dir", str(tmp_path / "out"),
                              "--deepspeed", "none", "--model_name_or_path", str(tmp_path / "no-model")])
    assert stopped.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"{bad}:2: 2 <image> placeholder(s) but 1 image(s)" in line
