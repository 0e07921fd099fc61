"""A dropped caption trains SDXL's unconditional input: zero text embeddings (what SDXL was trained with and what
its pipeline's ``force_zeros_for_empty_prompt`` gives CFG), not the encoded empty caption. In the miniature world
the encoded "" made adapter training forget the face (docs/miniature.md)."""

from __future__ import annotations

import pytest
import torch
from conftest_train import make_index_dataset, tiny_args

import train_instantId_sdxl as train


@pytest.mark.parametrize("zeros", [True, False])
def test_dropped_caption_conditions_on_zeros(tiny_dir, tmp_path, zeros):
    from faceid.train.dataset import FaceTrainDataset, collate
    from faceid.train.model import compute_loss, encode_text, load_components, micro_generator
    from faceid.train.records import load_checked_records

    index = make_index_dataset(tmp_path / "d")
    flag = "--text_drop_zeros" if zeros else "--no-text_drop_zeros"
    args = train.parse_args(tiny_args(tiny_dir, tmp_path / "o", "--data_json_file", str(index), flag))
    parts = load_components(args, torch.float32, "cpu")
    records, _ = load_checked_records(str(index))
    toks = (parts["tokenizer"], parts["tokenizer_2"])
    kept = FaceTrainDataset(records, toks, resolution=64, text_drop=0, face_drop=0, both_drop=0)
    dropped = FaceTrainDataset(records, toks, resolution=64, text_drop=1, face_drop=0, both_drop=0)
    batch = collate([dropped[0], kept[1]])
    assert batch["drop_text"] == [True, False] and batch["caption"][0] == ""
    seen = {}

    def model(noisy, timesteps, prompt_embeds, added, face_embeds, kps_image):
        seen.update(prompt=prompt_embeds, pooled=added["text_embeds"])
        return torch.zeros_like(noisy)

    parts["model"] = model
    compute_loss(batch, parts, args, micro_generator(0, 0, 0, "cpu"), torch.float32)
    with torch.no_grad():
        encoded, pooled = encode_text([parts["text_encoder"], parts["text_encoder_2"]],
                                      [batch["input_ids"], batch["input_ids_2"]])  # fmt: skip
    assert encoded[0].abs().sum() > 0 and pooled[0].abs().sum() > 0  # "" encodes to something non-zero
    torch.testing.assert_close(seen["prompt"][1], encoded[1])  # kept caption untouched
    torch.testing.assert_close(seen["pooled"][1], pooled[1])
    if zeros:
        assert seen["prompt"][0].abs().max() == 0 and seen["pooled"][0].abs().max() == 0
    else:
        torch.testing.assert_close(seen["prompt"][0], encoded[0])
        torch.testing.assert_close(seen["pooled"][0], pooled[0])
