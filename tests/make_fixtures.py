#!/usr/bin/env python3
"""Reference-fixture generator for the Rust port of Stable Diffusion + T-GATE.

Run from the repository root:

    python3 tests/make_fixtures.py

It writes, deterministically (CPU, float32, fixed seeds, one thread):

  tests/fixtures/clip-tokenizer/   the real CLIP BPE vocabulary (from the open-clip-torch wheel) in the
                                   Hugging Face layout + cases.json (ids/masks from transformers.CLIPTokenizer)
  tests/fixtures/sd1/              a tiny SD-1.x style diffusers pipeline (f32) + reference.{safetensors,json}
  tests/fixtures/sd2/              a tiny SD-2.x style diffusers pipeline (fp16 variant only, v-prediction,
                                   old VAE attention key names) + reference.{safetensors,json}

The CLIP vocabulary is read from `open_clip/bpe_simple_vocab_16e6.txt.gz` inside the open-clip-torch wheel.
Give the wheel's path in the environment variable OPEN_CLIP_WHEEL; without it the script tries an installed
`open_clip` package and then `pip download --no-deps open-clip-torch==3.3.0` into a temporary directory.

See tests/requirements.txt for the exact versions the fixtures were made with.
"""

from __future__ import annotations

import copy
import glob
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import tgate
from tgate import TgateSDLoader

try:
    from importlib.metadata import version as _pkg_version
except ImportError:  # pragma: no cover
    _pkg_version = None

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

OPEN_CLIP_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES_FULL = 49152 - 256 - 2  # 48894, as open_clip / SD's tokenizer
N_MERGES_TINY = 1000

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}

# The scheduler_config.json files exactly as the real checkpoints ship them (note: no timestep_spacing, so
# `OtherScheduler.from_config(...)` falls back to the *other* class's own default, e.g. "linspace" for Euler).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

PROMPT = "a tiny red fox"
NEGATIVE_PROMPT = "blurry"
TEXT_PROMPTS = ["a tiny red fox", ""]
STEPS = 8
GUIDANCE = 7.5
HEIGHT = WIDTH = 64
UNET_TIMESTEP = 617.0
SCHED_STEPS = 10

# T-GATE runs. "tgate" = the original cross-attention-only gate, "tgate_sa" = with the self-attention cache
# schedule. "tgate_sp" (extra) is chosen so that self-attention is *reused* in the semantics-planning phase
# too (with tgate_sa's settings cur_step 2 is a multiple of sp_interval, so no SP reuse ever happens).
GATE_RUNS = {
    "tgate": dict(gate_step=3, sp_interval=1, fi_interval=1, warm_up=0),
    "tgate_sa": dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1),
    "tgate_sp": dict(gate_step=6, sp_interval=3, fi_interval=1, warm_up=1),
}

SANE_MAX = 1e3


# ----------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------

def setup_determinism():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as e:  # pragma: no cover
        print("note: torch.use_deterministic_algorithms(True) failed:", e)
    torch.set_default_dtype(torch.float32)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(shape, g: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# CLIP vocabulary
# ----------------------------------------------------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode map, in its canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _read_bpe_from_wheel(path) -> str:
    with zipfile.ZipFile(path) as z:
        return gzip.decompress(z.read(BPE_MEMBER)).decode("utf-8")


def load_bpe_lines() -> list[str]:
    wheel = os.environ.get("OPEN_CLIP_WHEEL")
    if wheel:
        print(f"CLIP BPE: reading {BPE_MEMBER} from OPEN_CLIP_WHEEL={wheel}")
        text = _read_bpe_from_wheel(wheel)
    else:
        text = None
        try:
            import importlib.util

            spec = importlib.util.find_spec("open_clip")
            if spec is not None and spec.submodule_search_locations:
                p = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
                if p.exists():
                    print(f"CLIP BPE: reading installed {p}")
                    text = gzip.decompress(p.read_bytes()).decode("utf-8")
        except Exception:
            text = None
        if text is None:
            tmp = tempfile.mkdtemp(prefix="open_clip_wheel_")
            print(f"CLIP BPE: pip download --no-deps open-clip-torch=={OPEN_CLIP_VERSION} into {tmp}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 f"open-clip-torch=={OPEN_CLIP_VERSION}", "-d", tmp],
                check=True,
            )
            wheels = glob.glob(os.path.join(tmp, "open_clip_torch-*.whl"))
            assert wheels, "pip download produced no open_clip_torch wheel"
            text = _read_bpe_from_wheel(wheels[0])
            shutil.rmtree(tmp, ignore_errors=True)
    lines = text.split("\n")
    assert len(lines) > N_MERGES_FULL + 1, len(lines)
    return lines


def build_vocab(bpe_lines: list[str], n_merges: int):
    merges = bpe_lines[1 : n_merges + 1]
    assert len(merges) == n_merges
    for m in merges:
        assert len(m.split(" ")) == 2, repr(m)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS, EOS]
    assert len(tokens) == 512 + n_merges + 2
    assert len(set(tokens)) == len(tokens), "duplicate vocabulary entries"
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, merges


def added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer_dir(d: Path, vocab: dict, merges: list[str], pad_token: str):
    """The file set of SD 1.5's / SD 2.1's tokenizer/ folder (vocab.json, merges.txt, configs)."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(m + "\n")
    tok_cfg = {
        "add_prefix_space": False,
        "bos_token": added_token(BOS),
        "do_lower_case": True,
        "eos_token": added_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOS),
    }
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    stm = {
        "bos_token": {k: v for k, v in added_token(BOS).items() if k != "__type"},
        "eos_token": {k: v for k, v in added_token(EOS).items() if k != "__type"},
        "pad_token": pad_token,
        "unk_token": {k: v for k, v in added_token(EOS).items() if k != "__type"},
    }
    with open(d / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(stm, f, indent=2, ensure_ascii=False)


def tokenize_cases(tok: CLIPTokenizer, prompts: list[str]):
    out = []
    for p in prompts:
        enc = tok(p, padding="max_length", max_length=77, truncation=True)
        ids, mask = list(map(int, enc["input_ids"])), list(map(int, enc["attention_mask"]))
        assert len(ids) == 77 and len(mask) == 77
        out.append({"prompt": p, "ids": ids, "mask": mask})
    return out


def exact_token_prompt(tok: CLIPTokenizer, n_tokens: int) -> str:
    """A natural-looking prompt that is exactly n_tokens BPE tokens long (without BOS/EOS)."""
    words = ("a photo of a cat sitting on the red mat in the garden with a small dog and "
             "a blue bird under the old tree at night").split()
    out, i = [], 0
    while True:
        cand = " ".join(out + [words[i % len(words)]])
        n = len(tok(cand, add_special_tokens=False)["input_ids"])
        if n > n_tokens:
            raise RuntimeError("could not hit the exact token count")
        out.append(words[i % len(words)])
        i += 1
        if n == n_tokens:
            return cand


def tricky_prompts(tok: CLIPTokenizer) -> list[str]:
    long300 = ("A highly detailed matte painting of an ancient castle perched on a cliff above a stormy sea, "
               "dramatic lighting, volumetric fog, crashing waves, seagulls circling the towers, "
               "intricate stonework, moss covered walls, glowing windows, by a famous artist, trending on "
               "artstation, 8k resolution, ultra realistic, cinematic composition, golden hour")
    long300 = long300[:300]
    assert len(long300) == 300
    return [
        "a tiny red fox",
        "Café crème brûlée",
        "wow!!! ... ?!",
        "don't it's we'll they're I'd you've I'm",
        "1234567 3.14",
        "🦊🔥",
        "東京の夜景",
        "tabs\tand\nnewlines   and  multiple    spaces",
        "  leading and trailing spaces  ",
        "UPPER CASE PROMPT",
        "",
        "&amp; <b>bold</b>",
        "<|startoftext|>literal special tokens<|endoftext|>",
        "naïve façade Ångström Straße",
        "a__b--c..d",
        long300,
        exact_token_prompt(tok, 75),
        exact_token_prompt(tok, 76),
    ]


PIPE_TOKENIZER_PROMPTS_EXTRA = [
    "a tiny red fox",
    "blurry",
    "Café crème brûlée!!!",
    "don't 1234567 🦊",
    "",
]


# ----------------------------------------------------------------------------------------------------------
# randomisation
# ----------------------------------------------------------------------------------------------------------

def randomise_(module: nn.Module, g: torch.Generator, report: dict | None = None):
    """Overwrite EVERY parameter:
       norm weights 1+0.1N, biases 0.1N, embeddings N(0,1), Linear/Conv weights N(0, 1/fan_in)."""
    done = set()
    kinds = {}
    with torch.no_grad():
        for _, m in module.named_modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.copy_(1.0 + 0.1 * randn(m.weight.shape, g))
                    done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.copy_(0.1 * randn(m.bias.shape, g))
                    done.add(id(m.bias))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(randn(m.weight.shape, g))
                done.add(id(m.weight))
        for name, p in module.named_parameters():
            if id(p) in done:
                kinds[name] = "norm/embedding"
                continue
            if name.endswith("bias"):
                p.copy_(0.1 * randn(p.shape, g))
                kinds[name] = "bias"
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(randn(p.shape, g) / fan_in**0.5)
                kinds[name] = f"fan_in={fan_in}"
            else:
                p.copy_(1.0 + 0.1 * randn(p.shape, g))
                kinds[name] = "other-1d"
                print("  note: unusual 1-d parameter randomised as 1+0.1N:", name)
        for name, p in module.named_parameters():
            assert torch.isfinite(p).all(), name
            assert (p != 0).all(), f"zero left in {name}"
    if report is not None:
        report.update(kinds)
    return module


def round_fp16_(module: nn.Module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())
    return module


# ----------------------------------------------------------------------------------------------------------
# model configs
# ----------------------------------------------------------------------------------------------------------

def text_config(kind: str, tok: CLIPTokenizer) -> CLIPTextConfig:
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        dropout=0.0,
    )
    if kind == "sd1":
        return CLIPTextConfig(num_hidden_layers=3, hidden_act="quick_gelu", **common)
    return CLIPTextConfig(num_hidden_layers=2, hidden_act="gelu", **common)


def unet_config(kind: str) -> dict:
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    if kind == "sd1":
        cfg.update(layers_per_block=2, attention_head_dim=4, use_linear_projection=False)
    else:
        cfg.update(layers_per_block=1, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                   upcast_attention=True)
    return cfg


def vae_config() -> dict:
    # NOTE: four blocks (not two) so that vae_scale_factor = 2**(4-1) = 8 like real SD: 64x64 images <-> 8x8
    # latents. With two blocks the pipeline would use a scale factor of 2 and 32x32 latents at height 64.
    # Channels kept small (8/16) to keep the fixtures small; with 8 groups the 8-channel norms have one
    # channel per group, the 16-channel ones two.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


# ----------------------------------------------------------------------------------------------------------
# randomness guards / injected noise
# ----------------------------------------------------------------------------------------------------------

_RANDN_MODULES = [
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_pndm",
    "diffusers.schedulers.scheduling_euler_discrete",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "diffusers.schedulers.scheduling_lcm",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img",
]
# The schedulers that draw noise at their steps: they get the stored tensors in order.
_NOISY_SCHEDULERS = [
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_lcm",
]


@contextmanager
def noise_source(step_noise: torch.Tensor | None):
    """Replace `randn_tensor` everywhere the runs might draw noise. The Euler-ancestral and LCM schedulers get
    the stored tensors in order; any other draw is an error (there must be no hidden randomness)."""
    import importlib

    mods = [importlib.import_module(m) for m in _RANDN_MODULES]
    saved = [(m, getattr(m, "randn_tensor", None)) for m in mods]
    state = {"used": 0}

    def forbidden(*a, **k):
        raise AssertionError("unexpected randn_tensor call (hidden randomness)")

    def feed(shape, generator=None, device=None, dtype=None, layout=None, **kw):
        assert step_noise is not None, "a scheduler drew noise but none was provided"
        i = state["used"]
        assert i < len(step_noise), f"a scheduler wanted more than {len(step_noise)} noise tensors"
        n = step_noise[i]
        assert tuple(shape) == tuple(n.shape), (shape, n.shape)
        state["used"] += 1
        return n.clone().to(device=device or "cpu", dtype=dtype or torch.float32)

    for m, _ in saved:
        if hasattr(m, "randn_tensor"):
            m.randn_tensor = forbidden
    for m in _NOISY_SCHEDULERS:
        importlib.import_module(m).randn_tensor = feed
    try:
        yield state
    finally:
        for m, f in saved:
            if f is not None:
                m.randn_tensor = f


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def json_safe(x):
    """Replaces non-finite floats by their string names, recursively (JSON has no Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def versions():
    v = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tgate": getattr(tgate, "__version__", None),
    }
    if _pkg_version is not None:
        for pkg in ["tgate", "safetensors", "tokenizers", "numpy"]:
            try:
                v[pkg] = _pkg_version(pkg)
            except Exception:
                pass
    return v


def sched_config_dict(s) -> dict:
    d = {k: v for k, v in dict(s.config).items() if not k.startswith("_")}
    d["_class_name"] = type(s).__name__
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def fresh_sched(name: str, base_config):
    return SCHEDULERS[name].from_config(base_config)


# ----------------------------------------------------------------------------------------------------------
# pipeline build / save
# ----------------------------------------------------------------------------------------------------------

def build_models(kind: str, tok: CLIPTokenizer, seed: int):
    te = CLIPTextModel(text_config(kind, tok))
    unet = UNet2DConditionModel(**unet_config(kind))
    vae = AutoencoderKL(**vae_config())
    randomise_(te, gen(seed + 1))
    randomise_(unet, gen(seed + 2))
    randomise_(vae, gen(seed + 3))
    for m in (te, unet, vae):
        m.eval()
        m.requires_grad_(False)
    if kind == "sd2":
        for m in (te, unet, vae):
            round_fp16_(m)
    return te, unet, vae


def make_pipe(te, unet, vae, tok, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


OLD_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def rename_vae_attention_keys(path: Path) -> list[tuple[str, str]]:
    sd = load_file(str(path))
    renamed, out = [], {}
    for k, v in sd.items():
        nk = k
        if ".mid_block.attentions." in k:
            for new, old in OLD_VAE_ATTN.items():
                seg = f".{new}."
                if seg in k:
                    nk = k.replace(seg, f".{old}.")
                    break
        if nk != k:
            renamed.append((k, nk))
        out[nk] = v
    assert len(renamed) == 2 * 8, renamed  # encoder + decoder mid attention: 4 linears x (weight, bias)
    save_file(out, str(path), metadata={"format": "pt"})
    return renamed


def save_pipeline(kind, out_dir: Path, te, unet, vae, vocab, merges, pad_token, sched_cfg) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # scheduler + tokenizer exactly as real checkpoints ship them
    (out_dir / "scheduler").mkdir()
    with open(out_dir / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(sched_cfg, f, indent=2)
    write_tokenizer_dir(out_dir / "tokenizer", vocab, merges, pad_token)
    tok = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    sched_cls = SCHEDULERS["pndm" if sched_cfg["_class_name"] == "PNDMScheduler" else "ddim"]
    scheduler = sched_cls.from_pretrained(out_dir, subfolder="scheduler")

    pipe = make_pipe(te, unet, vae, tok, scheduler)
    info = {}
    if kind == "sd1":
        pipe.save_pretrained(out_dir, safe_serialization=True)
    else:
        pipe.to(torch.float16)
        pipe.save_pretrained(out_dir, safe_serialization=True, variant="fp16")
        pipe.to(torch.float32)
    # save_pretrained rewrote these two: put the hand-written (real-checkpoint style) files back
    with open(out_dir / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(sched_cfg, f, indent=2)
    write_tokenizer_dir(out_dir / "tokenizer", vocab, merges, pad_token)

    # transformers 5.x writes CLIPTextModel keys without the `text_model.` prefix that every real SD
    # checkpoint has; rewrite them in the real-checkpoint layout (transformers loads both identically)
    te_file = out_dir / "text_encoder" / ("model.safetensors" if kind == "sd1" else "model.fp16.safetensors")
    te_sd = load_file(str(te_file))
    if not all(k.startswith("text_model.") for k in te_sd):
        save_file({("text_model." + k if not k.startswith("text_model.") else k): v for k, v in te_sd.items()},
                  str(te_file), metadata={"format": "pt"})
        info["text_encoder_keys"] = "rewritten with the `text_model.` prefix (real SD checkpoint layout)"
    te2 = CLIPTextModel.from_pretrained(out_dir / "text_encoder", variant="fp16" if kind == "sd2" else None,
                                        dtype=torch.float32)
    sd_a, sd_b = te.state_dict(), te2.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k

    if kind == "sd2":
        vae_file = out_dir / "vae" / "diffusion_pytorch_model.fp16.safetensors"
        assert vae_file.exists(), list((out_dir / "vae").iterdir())
        renamed = rename_vae_attention_keys(vae_file)
        info["vae_renamed_keys"] = [[a, b] for a, b in renamed]
        for sub in ("unet", "vae", "text_encoder"):
            names = sorted(p.name for p in (out_dir / sub).iterdir())
            assert not any(n in ("diffusion_pytorch_model.safetensors", "model.safetensors") for n in names), names
        # diffusers must load the renamed file identically (it converts the deprecated names)
        vae2 = AutoencoderKL.from_pretrained(out_dir, subfolder="vae", variant="fp16", dtype=torch.float32)
        sd_a, sd_b = vae.state_dict(), vae2.state_dict()
        assert sd_a.keys() == sd_b.keys()
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), k
        print("  sd2: VAE with old attention names (query/key/value/proj_attn) reloads identically")
    for f in out_dir.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return info


# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------

def text_refs(pipe, tok, R):
    te = pipe.text_encoder
    enc = tok(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = enc.input_ids.to(torch.int64)
    mask = enc.attention_mask.to(torch.int64)
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        last = out.last_hidden_state
        # transformers 5.x flattened CLIPTextModel (no `.text_model`), so diffusers' own clip_skip branch
        # (`self.text_encoder.text_model.final_layer_norm(...)`) raises AttributeError; compute what it
        # computes: hidden_states[-(clip_skip + 1)] through the final layer norm.
        assert len(out.hidden_states) == te.config.num_hidden_layers + 1
        assert torch.equal(te.final_layer_norm(out.hidden_states[-1]), last)
        skip1 = te.final_layer_norm(out.hidden_states[-2])
        try:
            skip1_diffusers, _ = pipe.encode_prompt(TEXT_PROMPTS, torch.device("cpu"), 1, False, clip_skip=1)
            assert torch.allclose(skip1, skip1_diffusers, atol=1e-6)
        except AttributeError as e:
            print(f"  note: diffusers encode_prompt(clip_skip=1) fails with this transformers: {e}")
        masked = te(ids, attention_mask=mask).last_hidden_state
        plain, _ = pipe.encode_prompt(TEXT_PROMPTS, torch.device("cpu"), 1, False)
    assert torch.equal(plain, last), "encode_prompt without clip_skip != last_hidden_state"
    R["text.input_ids"] = ids
    R["text.attention_mask"] = mask
    R["text.last_hidden_state"] = last
    R["text.clip_skip_1"] = skip1
    R["text.masked_last_hidden_state"] = masked
    d = (masked - last).abs().max().item()
    print(f"  text: masked vs unmasked last_hidden_state max diff {d:.3g}")


def unet_refs(pipe, g, R):
    sample = randn((2, 4, 8, 8), g)
    ehs = randn((2, 77, 32), g)
    t = torch.tensor([UNET_TIMESTEP], dtype=torch.float32)
    with torch.no_grad():
        out = pipe.unet(sample, t, encoder_hidden_states=ehs).sample
    R["unet.sample"] = sample
    R["unet.timestep"] = t
    R["unet.encoder_hidden_states"] = ehs
    R["unet.out"] = out


def vae_refs(pipe, g, R):
    z = randn((1, 4, 8, 8), g)
    with torch.no_grad():
        img = pipe.vae.decode(z).sample
    R["vae.z"] = z
    R["vae.image"] = img


def scheduler_refs(base_config, g, R, meta):
    for name in SCHEDULERS:
        s = fresh_sched(name, base_config)
        s.set_timesteps(SCHED_STEPS)
        ts = s.timesteps
        n = len(ts)
        x0 = randn((1, 4, 8, 8), g)
        model_outputs = randn((n, 1, 4, 8, 8), g)
        step_noise = randn((n, 1, 4, 8, 8), g) if name == "euler-a" else None
        sample = x0 * s.init_noise_sigma
        samples, scaled = [sample.clone()], []
        with noise_source(step_noise) as st, torch.no_grad():
            for i, t in enumerate(ts):
                scaled.append(s.scale_model_input(sample, t).clone())
                sample = s.step(model_outputs[i], t, sample).prev_sample
                samples.append(sample.clone())
        if step_noise is not None:
            assert st["used"] == n, (st["used"], n)
            R[f"sched.{name}.step_noise"] = step_noise
        else:
            assert st["used"] == 0
        R[f"sched.{name}.timesteps"] = ts.to(torch.float32)
        R[f"sched.{name}.init_noise_sigma"] = torch.tensor([float(s.init_noise_sigma)], dtype=torch.float32)
        R[f"sched.{name}.x0"] = x0
        R[f"sched.{name}.samples"] = torch.stack(samples)
        R[f"sched.{name}.scaled_inputs"] = torch.stack(scaled)
        R[f"sched.{name}.model_outputs"] = model_outputs
        meta[name] = {
            "class": type(s).__name__,
            "num_timesteps": n,
            "order": s.order,
            "timesteps": [int(x) for x in ts.tolist()],
            "config": sched_config_dict(s),
        }


class PipeFactory:
    """Every run gets a fresh UNet (tgate patches Attention.forward and stores `cache` on the modules) and a
    fresh scheduler made with `Cls.from_config(original config)`."""

    def __init__(self, te, unet, vae, tok, base_config):
        self.te, self.unet, self.vae, self.tok, self.base_config = te, unet, vae, tok, base_config

    def __call__(self, sched_name):
        unet = copy.deepcopy(self.unet)
        for m in unet.modules():
            assert not hasattr(m, "cache")
        return make_pipe(self.te, unet, self.vae, self.tok, fresh_sched(sched_name, self.base_config))


def run_full(pipe, noise, step_noise, sched_name):
    with noise_source(step_noise if sched_name == "euler-a" else None) as st, torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   height=HEIGHT, width=WIDTH, latents=noise.clone(), output_type="latent").images
    if sched_name == "euler-a":
        assert st["used"] == STEPS, (st["used"], STEPS)
    return out


def run_tgate(pipe, noise, step_noise, sched_name, gate):
    pipe = TgateSDLoader(pipe)
    with noise_source(step_noise if sched_name == "euler-a" else None) as st, torch.no_grad():
        out = pipe.tgate(PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH, latents=noise.clone(),
                         output_type="latent", **gate).images
    if sched_name == "euler-a":
        assert st["used"] == STEPS, (st["used"], STEPS)
    return out


def tgate_schedule_table(sched, gate):
    """What tgate does at each denoising-loop index i (for the report / the port's tests)."""
    from tgate.tgate_utils import tgate_scheduler

    sched.set_timesteps(STEPS)
    n = len(sched.timesteps)
    nw = n - STEPS * sched.order
    rows = []
    current = ({"cache": False, "reuse": False}, {"cache": False, "reuse": False}, True)
    for i in range(n):
        registered = False
        if i == n - 1 or ((i + 1) > nw and (i + 1) % sched.order == 0):
            current = tgate_scheduler(cur_step=i - nw, **gate)
            registered = True
        ca, sa, keep = current
        rows.append({
            "i": i, "cur_step": i - nw, "cfg": (i - nw) < gate["gate_step"], "registered": registered,
            "ca": "reuse" if ca["reuse"] else ("cache" if ca["cache"] else "compute"),
            "sa": "reuse" if sa["reuse"] else ("cache" if sa["cache"] else "compute"),
            "keep_shape": keep,
        })
    return {"num_timesteps": n, "num_warmup_steps": nw, "steps": rows}


def pipeline_refs(kind, factory, default_sched, g, R, meta, checks):
    noise = randn((1, 4, 8, 8), g)
    step_noise = randn((STEPS, 1, 4, 8, 8), g)
    R["pipe.noise"] = noise
    R["pipe.step_noise"] = step_noise
    for name in SCHEDULERS:
        full = run_full(factory(name), noise, step_noise, name)
        R[f"pipe.{name}.full"] = full
        ck = {}
        for run, gate in GATE_RUNS.items():
            out = run_tgate(factory(name), noise, step_noise, name, gate)
            R[f"pipe.{name}.{run}"] = out
            ck[f"{run}_vs_full_max_abs_diff"] = float((out - full).abs().max())
        # gate_step = STEPS: no gating within the 8 steps
        nogate = run_tgate(factory(name), noise, step_noise, name,
                           dict(gate_step=STEPS, sp_interval=1, fi_interval=1, warm_up=0))
        ck["gate_step_8_vs_full_max_abs_diff"] = float((nogate - full).abs().max())
        # reproducibility of a tgate run on a fresh pipeline
        again = run_tgate(factory(name), noise, step_noise, name, GATE_RUNS["tgate"])
        ck["tgate_rerun_max_abs_diff"] = float((again - R[f"pipe.{name}.tgate"]).abs().max())
        ck["full_max_abs"] = max_abs(full)
        checks[name] = ck
        meta[name] = {g_: tgate_schedule_table(fresh_sched(name, factory.base_config), GATE_RUNS[g_])
                      for g_ in GATE_RUNS}
        print(f"  pipe {name:8s} |full|max={max_abs(full):8.4f} " +
              " ".join(f"{k}={v:.3g}" for k, v in ck.items() if k != "full_max_abs"))
        for run in GATE_RUNS:
            assert ck[f"{run}_vs_full_max_abs_diff"] > 1e-3, f"{run} did not change the result for {name}"
    pipe = factory(default_sched)
    with torch.no_grad():
        img = pipe.vae.decode(R[f"pipe.{default_sched}.full"] / pipe.vae.config.scaling_factor).sample
    R["pipe.default.image"] = img


def verify_reload(kind, out_dir: Path, R, default_sched, base_config):
    kw = dict(safety_checker=None, dtype=torch.float32)
    if kind == "sd2":
        kw["variant"] = "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(out_dir, **kw)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == SCHEDULERS[default_sched].__name__
    assert pipe.text_encoder.dtype == torch.float32 and pipe.unet.dtype == torch.float32
    res = {}
    with torch.no_grad():
        res["text.last_hidden_state"] = float((pipe.text_encoder(R["text.input_ids"]).last_hidden_state
                                               - R["text.last_hidden_state"]).abs().max())
        res["unet.out"] = float((pipe.unet(R["unet.sample"], R["unet.timestep"],
                                           encoder_hidden_states=R["unet.encoder_hidden_states"]).sample
                                 - R["unet.out"]).abs().max())
        res["vae.image"] = float((pipe.vae.decode(R["vae.z"]).sample - R["vae.image"]).abs().max())
    tok = pipe.tokenizer
    ids = tok(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, R["text.input_ids"]), "reloaded tokenizer gives other ids"
    # the full pipeline with the folder's own scheduler, and euler-a (injected noise) with a swapped scheduler
    out = run_full(pipe, R["pipe.noise"], R["pipe.step_noise"], default_sched)
    res[f"pipe.{default_sched}.full"] = float((out - R[f"pipe.{default_sched}.full"]).abs().max())
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    out = run_full(pipe, R["pipe.noise"], R["pipe.step_noise"], "euler-a")
    res["pipe.euler-a.full"] = float((out - R["pipe.euler-a.full"]).abs().max())
    # and one tgate run on the reloaded pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = run_tgate(pipe, R["pipe.noise"], R["pipe.step_noise"], "ddim", GATE_RUNS["tgate_sa"])
    res["pipe.ddim.tgate_sa"] = float((out - R["pipe.ddim.tgate_sa"]).abs().max())
    for k, v in res.items():
        print(f"  reload {kind}: {k:28s} max diff {v:.3g}")
        assert v <= 1e-5 * max(1.0, max_abs(R[k])), (k, v)
    return res


def make_pipeline_fixture(kind, bpe_lines, seed):
    print(f"== {kind}")
    out_dir = FIX / kind
    vocab, merges = build_vocab(bpe_lines, N_MERGES_TINY)
    pad_token = EOS if kind == "sd1" else "!"
    # a temporary tokenizer (same files) to size the text encoder's ids
    tmp_tok_dir = Path(tempfile.mkdtemp(prefix=f"tok_{kind}_"))
    write_tokenizer_dir(tmp_tok_dir, vocab, merges, pad_token)
    tok = CLIPTokenizer.from_pretrained(tmp_tok_dir)
    shutil.rmtree(tmp_tok_dir)
    assert len(tok) == 512 + N_MERGES_TINY + 2 == 1514, len(tok)
    assert tok.model_max_length == 77
    assert tok.pad_token == pad_token

    te, unet, vae = build_models(kind, tok, seed)
    sched_cfg = SD15_SCHEDULER_CONFIG if kind == "sd1" else SD21_SCHEDULER_CONFIG
    default_sched = "pndm" if kind == "sd1" else "ddim"
    save_info = save_pipeline(kind, out_dir, te, unet, vae, vocab, merges, pad_token, sched_cfg)

    # everything below uses the tokenizer + scheduler as loaded from the written folder
    tok = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    base_sched = SCHEDULERS[default_sched].from_pretrained(out_dir, subfolder="scheduler")
    base_config = base_sched.config
    factory = PipeFactory(te, unet, vae, tok, base_config)

    R, sched_meta, gate_meta, checks = {}, {}, {}, {}
    g = gen(seed + 100)
    pipe0 = factory(default_sched)
    text_refs(pipe0, tok, R)
    unet_refs(pipe0, g, R)
    vae_refs(pipe0, g, R)
    scheduler_refs(base_config, gen(seed + 200), R, sched_meta)
    pipeline_refs(kind, factory, default_sched, gen(seed + 300), R, gate_meta, checks)

    # sanity
    bad = []
    for k, v in R.items():
        if v.is_floating_point():
            if not torch.isfinite(v).all() or max_abs(v) > SANE_MAX:
                bad.append((k, max_abs(v)))
    assert not bad, f"insane reference values (rescale weights): {bad}"

    R = {k: v.contiguous() for k, v in R.items()}
    save_file(R, str(out_dir / "reference.safetensors"), metadata={"generator": "tests/make_fixtures.py"})
    R2 = load_file(str(out_dir / "reference.safetensors"))
    assert R2.keys() == R.keys() and all(torch.equal(R2[k], R[k]) for k in R)

    reload = verify_reload(kind, out_dir, R2, default_sched, base_config)

    tok_cases = tokenize_cases(tok, PIPE_TOKENIZER_PROMPTS_EXTRA + [
        "wow!!! ... ?!", "東京の夜景 🦊🔥", "tabs\tand\nnewlines   and  spaces", exact_token_prompt(tok, 76)])
    meta = {
        "kind": kind,
        "description": ("SD1-style tiny pipeline, float32 weights" if kind == "sd1" else
                        "SD2-style tiny pipeline, fp16 variant weights only (compute in f32 from the f16 "
                        "values), v-prediction, VAE mid-block attention saved with old key names"),
        "versions": versions(),
        "weights_dtype_on_disk": "float32" if kind == "sd1" else "float16 (variant fp16)",
        "reference_dtype": "float32 (int64 for text.input_ids / text.attention_mask)",
        "randomisation": ("every parameter overwritten: LayerNorm/GroupNorm weight 1+0.1*N(0,1), bias "
                          "0.1*N(0,1); nn.Embedding N(0,1); other biases 0.1*N(0,1); Linear/Conv weights "
                          "N(0,1)/sqrt(fan_in); no zeros left (checked)" +
                          ("; then rounded to float16" if kind == "sd2" else "")),
        "seed": seed,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "text_prompts": TEXT_PROMPTS,
        "steps": STEPS,
        "guidance": GUIDANCE,
        "height": HEIGHT,
        "width": WIDTH,
        "latents_note": "pipe.noise is standard normal, passed as latents=; diffusers multiplies it by "
                        "scheduler.init_noise_sigma itself",
        "output_type": "latent",
        "unet.timestep": UNET_TIMESTEP,
        "scheduler_steps": SCHED_STEPS,
        "schedulers": list(SCHEDULERS),
        "scheduler_classes": {k: v.__name__ for k, v in SCHEDULERS.items()},
        "default_scheduler": default_sched,
        "scheduler_config_file": sched_cfg,
        "scheduler_details": sched_meta,
        "gate_runs": GATE_RUNS,
        "gate_schedules": gate_meta,
        "euler_a_noise": ("randn_tensor in diffusers.schedulers.scheduling_euler_ancestral_discrete replaced "
                          "by stored standard-normal tensors handed out in order: sched.euler-a.step_noise "
                          "(scheduler test) and pipe.step_noise (every euler-a pipeline run, fresh each run); "
                          "all consumed"),
        "checks": checks,
        "reload_check_max_abs_diff": reload,
        "model_configs": {
            "text_encoder": {k: v for k, v in te.config.to_dict().items()
                             if isinstance(v, (int, float, str, bool, list)) or v is None},
            "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()
                     if not k.startswith("_")},
            "vae": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items()
                    if not k.startswith("_")},
        },
        "tokenizer": {"vocab_size": len(tok), "n_merges": N_MERGES_TINY, "pad_token": pad_token,
                      "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                      "eos_token_id": tok.eos_token_id},
        "tokenizer_cases": tok_cases,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                        "max_abs": max_abs(v)} for k, v in R.items()},
    }
    meta.update(save_info)
    with open(out_dir / "reference.json", "w", encoding="utf-8") as f:
        # Strict JSON: non-finite floats (e.g. lambda_min_clipped = -inf) become strings.
        json.dump(json_safe(meta), f, indent=1, ensure_ascii=False, allow_nan=False)
    print(f"  reference tensors ({len(R)}):")
    for k, v in R.items():
        print(f"    {k:34s} {str(list(v.shape)):18s} {str(v.dtype)[6:]:8s} max|v|={max_abs(v):.4g}")
    return R


def make_clip_tokenizer_fixture(bpe_lines):
    print("== clip-tokenizer (real vocabulary)")
    d = FIX / "clip-tokenizer"
    vocab, merges = build_vocab(bpe_lines, N_MERGES_FULL)
    assert len(vocab) == 49408
    write_tokenizer_dir(d, vocab, merges, EOS)
    tok = CLIPTokenizer.from_pretrained(d)
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407 == tok.pad_token_id
    assert tok.model_max_length == 77
    # the well-known SD ids of "a tiny red fox"
    assert tok("a tiny red fox")["input_ids"] == [49406, 320, 5591, 736, 3240, 49407]
    cases = tokenize_cases(tok, tricky_prompts(tok))
    with open(d / "cases.json", "w", encoding="utf-8") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)
    c75, c76 = cases[-2], cases[-1]
    assert sum(c75["mask"]) == 77 and c75["ids"][-1] == 49407  # exactly fills 77 with BOS/EOS
    assert sum(c76["mask"]) == 77 and c76["ids"][-1] == 49407  # truncated, EOS kept
    print(f"  {len(cases)} cases; vocab {len(vocab)} merges {len(merges)}; size {dir_size(d) / 1e6:.2f} MB")


def main():
    setup_determinism()
    print("versions:", versions())
    bpe_lines = load_bpe_lines()
    FIX.mkdir(parents=True, exist_ok=True)
    make_clip_tokenizer_fixture(bpe_lines)
    make_pipeline_fixture("sd1", bpe_lines, seed=1000)
    make_pipeline_fixture("sd2", bpe_lines, seed=2000)

    print("== sizes")
    total = 0
    for f in sorted(FIX.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.stat().st_size:>10,d}  {f.relative_to(ROOT)}")
    print(f"  total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
