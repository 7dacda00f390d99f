"""Parameter and FLOP counting (dab_detr.analysis, tools/analyze_model.py) on small inputs."""
import runpy

import pytest
import torch
from conftest import MODEL_CONFIG, small_model_config
from detectron2.config import LazyConfig, instantiate
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch.nn import functional as F

from dab_detr.analysis import analyze_model, attention_flop_jit, count_parameters


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_handle_counts_both_matrix_products():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)
    plain = FlopCountAnalysis(_Attention(), (q, k, v)).unsupported_ops_warnings(False)
    assert plain.total() == 0  # what fvcore alone reports: the reason for the handle
    counted = FlopCountAnalysis(_Attention(), (q, k, v)).set_op_handle(
        "aten::scaled_dot_product_attention", attention_flop_jit
    )
    # q @ k^T: 2*4 heads x 5 x 7 x 8; attn @ v: 2*4 x 5 x 7 x 6
    assert counted.total() == 2 * 4 * 5 * 7 * (8 + 6)
    assert counted.by_operator() == {"attention": 2 * 4 * 5 * 7 * (8 + 6)}


def test_small_model_attention_flops_match_the_architecture():
    torch.manual_seed(0)
    model = instantiate(small_model_config())  # ResNet-18, d_model 64, 2 + 2 layers, 12 queries
    stats = analyze_model(model, 64, 96)
    # ResNet-18 C5 of a 64 x 96 image is 2 x 3 = 6 tokens; q/k heads are 8 wide (16 in the
    # decoder's cross-attention, content and position concatenated), value heads 8 wide
    d, tokens, queries = 64, 6, 12
    encoder = 2 * tokens * tokens * (d + d)
    decoder = 2 * (queries * queries * (d + d) + queries * tokens * (2 * d + d))
    assert stats.flops_by_operator["attention"] == encoder + decoder
    assert stats.flops == sum(stats.flops_by_operator.values())
    assert stats.flops_by_module["input_proj"] == tokens * 512 * d  # 1x1 conv from ResNet-18's 512 channels
    by_op = stats.flops_by_operator
    assert stats.flops_by_module["backbone"] + stats.flops_by_module["input_proj"] == by_op["conv"] + by_op["batch_norm"]
    assert (stats.params, stats.trainable_params) == count_parameters(model)
    assert stats.params == sum(p.numel() for p in model.parameters())
    # nothing that multiplies matrices is left uncounted
    assert not {op for op in stats.uncounted_ops if "matmul" in op or "attention" in op or "linear" in op}


def test_frozen_parameters_count_in_total_only():
    model = instantiate(small_model_config(**{"backbone.freeze_at": 2}))
    total, trainable = count_parameters(model)
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("backbone.stem", "backbone.res2")))
    assert frozen > 0 and total - trainable == frozen


def test_analyze_model_rejects_a_bad_size():
    with pytest.raises(ValueError, match="height and width must be positive"):
        analyze_model(nn.Linear(2, 2), 0, 10)


@pytest.fixture(scope="module")
def cli():
    """tools/analyze_model.py's ``main(argv)``, run in this process (no second interpreter start-up)."""
    return runpy.run_path("tools/analyze_model.py", run_name="analyze_model")["main"]


def test_cli_prints_parameters_and_gflops_of_a_config_with_overrides(cli, capsys):
    overrides = ["model.backbone.stages.depth=18", "model.transformer.num_encoder_layers=1",
                 "model.transformer.num_decoder_layers=1"]
    assert cli(["--config-file", MODEL_CONFIG, "--height", "64", "--width", "96", *overrides]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs at 64 x 96:" in out and "attention" in out
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(MODEL_CONFIG), overrides)
    assert int(line.split()[1].replace(",", "")) == count_parameters(instantiate(cfg.model))[0]


def test_cli_names_a_missing_config_file(cli):
    with pytest.raises(SystemExit, match="^error: config file configs/no_such_config.py does not exist$"):
        cli(["--config-file", "configs/no_such_config.py"])
