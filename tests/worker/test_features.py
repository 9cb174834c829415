"""The real-model instruments, on tiny stand-ins saved to disk the way an operator would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from worker.features import ClipScorer, InceptionFeatures, load_folder
from worker.tokenizer import write_clip_tokenizer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(folder, ["a", "red", "blue", "circle", "square"])
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def pictures(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


class TensorCLIP(CLIPModel):
    """torchmetrics 1.9 expects the tensors transformers 4 returned; transformers 5 returns
    an output object whose ``pooler_output`` is that tensor."""

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output


def test_clip_score_matches_torchmetrics_with_the_same_local_model(clip_folder):
    clip_mod = pytest.importorskip("torchmetrics.multimodal.clip_score")
    images = pictures(5)
    prompts = ["a red circle", "a blue square", "a red square", "a circle", "blue"]
    ours = ClipScorer(clip_folder, torch.device("cpu"), batch=2).score(images, prompts)
    model = TensorCLIP.from_pretrained(clip_folder)
    processor = CLIPProcessor.from_pretrained(clip_folder)
    metric = clip_mod.CLIPScore(model_name_or_path=lambda: (model, processor))
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2), prompts)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


def test_inception_features_from_a_torchscript_file(tmp_path):
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean(dim=(2, 3))

    path = tmp_path / "features.pt"
    torch.jit.script(Pool()).save(str(path))
    images = pictures(3)
    feats = InceptionFeatures(path, torch.device("cpu"), batch=2).features(images)
    assert torch.allclose(feats, torch.from_numpy(images).float().mean(dim=(1, 2)))


def test_reference_folder_loads_resized_rgb(tmp_path):
    Image.new("L", (64, 48), 200).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_folder(tmp_path, (32, 32), limit=10)
    assert images.shape == (2, 32, 32, 3) and images[0, 0, 0].tolist() == [200, 200, 200]
