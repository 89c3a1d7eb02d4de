"""param_groups: GaLore on attention and MLP projections, decay rules people expect."""
import pytest
import torch

import galore_ds
from tiny_models import tiny_llama


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_llama_groups():
    model = tiny_llama()
    groups = {g["name"]: g for g in galore_ds.param_groups(model, rank=8, weight_decay=0.1)}
    galore = _names(model, groups["galore"])
    assert len(galore) == 2 * 7 and all(n.endswith("proj.weight") for n in galore)
    assert _names(model, groups["decay"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("norm" in n for n in _names(model, groups["no_decay"]))
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["galore"]["weight_decay"] == 0.1
    # scale was not passed, so param_groups leaves it to the optimizer (torch's rule): the default
    assert groups["galore"]["rank"] == 8 and "scale" not in groups["galore"]
    built = {g["name"]: g for g in galore_ds.GaLoreAdamW(list(groups.values())).param_groups}
    assert built["galore"]["scale"] == 0.25 and built["galore"]["weight_decay"] == 0.1


def test_tied_embedding_appears_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    groups = galore_ds.param_groups(model, rank=8)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))


def test_matrices_smaller_than_rank_stay_full_rank():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(64, 64)
            self.mlp = torch.nn.Linear(64, 8)  # 8 rows < rank 16: nothing to save

    model = Block()
    groups = {g["name"]: g for g in galore_ds.param_groups(model, rank=16)}
    assert _names(model, groups["galore"]) == {"attn.weight"}
    assert _names(model, groups["decay"]) == {"mlp.weight"}
    assert _names(model, groups["no_decay"]) == {"attn.bias", "mlp.bias"}


def test_targets_that_match_nothing_name_the_fix():
    with pytest.raises(ValueError, match="target_modules"):
        galore_ds.param_groups(tiny_llama(), target_modules=("attention_xyz",), rank=8)


def test_galore_options_reach_only_the_galore_group():
    groups = galore_ds.param_groups(tiny_llama(), rank=8, refresh="randomized", stagger=True)
    opt = galore_ds.GaLoreAdamW(groups)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["galore"]["refresh"] == "randomized" and by_name["galore"]["stagger"]
    assert "rank" not in by_name["decay"]
