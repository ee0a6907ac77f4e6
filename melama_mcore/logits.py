"""The trunk's own fp32 logits for a checkpoint, at any TP/PP/VP layout, and `melama convert ...
--verify`, which compares them with transformers' on the converted folder before it is published.
Tests compare conversions, exports and adapters with the same logits. The model is the one training
builds and loads (ready_model.py), run through megatron's pipeline schedule."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from melama_mcore import ready_model
from melama_mcore.checkpoint.convert import Conversion
from melama_mcore.checkpoint.integrity import model_identity
from melama_mcore.checkpoint.opened import ADAPTERS, open_checkpoint
from melama_mcore.distributed import parallel
from melama_mcore.errors import CheckpointError
from melama_mcore.models.llama import state_dict_adapter as sda
from melama_mcore.models.llama.config_registry import LlamaArch
from melama_mcore.startup import start

log = logging.getLogger(__name__)

# --verify, max |logit difference| / max |logit|, both sides in fp32 on the same weights: what is
# left is summation order (observed ~1e-6 on CPU).
FP32_TOLERANCE = 1e-4


@torch.no_grad()
def framework_logits(ckpt: Path, arch: LlamaArch, tokens: torch.Tensor, tp: int = 1, pp: int = 1,
                     vp: int | None = None, divisible_by: int = 128, *, adapter: Path | None = None,
                     round_to: torch.dtype | None = None) -> torch.Tensor | None:
    """fp32 CPU logits [batch, seq, vocab] of the model initialised from checkpoint `ckpt` at a
    TP/PP/VP layout; with the adapters of the adapter checkpoint `adapter` on top when given;
    with every weight rounded to `round_to` first when given (what an export in that dtype holds).
    Runs on CPU (megatron on CPU needs CUDA hidden: start-up refuses otherwise). Call it on every
    rank (torchrun) or alone for 1x1; the last pipeline stage returns the logits gathered across TP
    with the vocab padding stripped, other ranks None."""
    cfg = sda.arch_config(arch, tp, pp, vp, divisible_by)
    weights = ckpt
    if adapter is not None:  # its adapters on `ckpt` as their base
        adapters = open_checkpoint(adapter, verify=False)
        if adapters.kind != ADAPTERS:
            raise CheckpointError(f"{adapter} is not an adapter checkpoint (its config.yaml has no peft.method: lora)")
        cfg.peft, cfg.checkpoint.init_from, weights = adapters.cfg.peft, str(ckpt), adapters.folder
    cfg.model.backend = "native"
    cfg.training.device, cfg.training.precision, cfg.training.seq_length = "cpu", "fp32", tokens.shape[1]
    runtime = start(cfg)
    try:
        chunks = ready_model.for_inference(cfg, runtime, weights, identity=model_identity(arch, None)).chunks
        for chunk in chunks:
            chunk.eval()
            if round_to is not None:
                for param in chunk.parameters():
                    param.copy_(param.to(round_to))
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        microbatches = pp if vp else 1  # the interleaved schedule needs a multiple of pp micro-batches

        def forward_step(data_iterator, model):
            return model(next(data_iterator), positions, None), lambda out, non_loss_data=False: out

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([tokens] * microbatches) for _ in chunks],
            model=chunks, num_microbatches=microbatches, seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0].contiguous())
        return logits[..., : arch.vocab_size].float()
    finally:
        parallel.shutdown()


# ---------------------------------------------------------------------------------------------
# --verify: the framework's logits against transformers'
# ---------------------------------------------------------------------------------------------
def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM  # the hf extra: only for --verify

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def verify_conversion(conversion: Conversion) -> float:
    """Max |difference| / max |logit| between transformers on the conversion's Hugging Face folder and
    the framework on its checkpoint (+ adapters), over a few random tokens, both in fp32 on CPU; a
    CheckpointError above the bound.

    The bound follows the export's dtype. On the same weights only summation order differs:
    FP32_TOLERANCE. When the export rounded the weights (bf16, fp16), the framework runs a second
    time with its own weights rounded to that dtype as the export rounds them; the shift of its
    logits is what this dtype's rounding does to these very logits, and the bound is
    FP32_TOLERANCE + 2 x that shift (for a plain export the export's weights are exactly the rounded
    ones; merged adapters are rounded once after the merge, a rounding of the same size)."""
    c = conversion
    tokens = torch.randint(0, c.arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # One process at TP 1, padded like the checkpoint (whatever TP it was padded for).
    ours = framework_logits(c.checkpoint, c.arch, tokens, divisible_by=c.padded_vocab, adapter=c.adapters)
    bound = FP32_TOLERANCE
    if c.rounded_to is not None:
        shift = relative_error(framework_logits(c.checkpoint, c.arch, tokens, divisible_by=c.padded_vocab,
                                                adapter=c.adapters, round_to=c.rounded_to), ours)
        bound += 2 * shift
        log.info("verify: rounding the weights to %s moves the framework's logits by %.2e (relative): bound %.2e",
                 str(c.rounded_to).removeprefix("torch."), shift, bound)
    error = relative_error(hf_logits(c.hf_dir, tokens), ours)
    log.info("verify: max |logit difference| / max |logit| = %.2e over %d tokens (bound %.1e)", error,
             tokens.numel(), bound)
    if error > bound:
        raise CheckpointError(f"verification failed: logits differ by {error:.2e} (relative) > {bound:.1e}; "
                              "nothing was written")
    return error
