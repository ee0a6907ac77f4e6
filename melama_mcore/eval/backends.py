"""lm-eval's `hf` and `vllm` models with what MIBE needs around generation: each MIBE request's
context is sent in the run's prompt format (prompts.py), and for each one the model records how many
tokens lm-eval cut from the prompt's left to fit the context (`max_length - max_gen_toks`, as both
backends truncate) and whether generation stopped at the token budget rather than at end-of-sequence.

The counts are keyed by the prompt's token ids as sent (its last `max_length - max_gen_toks`): each
backend's generation step records what it was given and how it ended. lm-eval's own tasks pass
through unchanged.
"""

from __future__ import annotations

import functools
import logging

from melama_mcore.eval.prompts import PromptFormat
from melama_mcore.eval.tasks import TASKS

log = logging.getLogger(__name__)


class _MibeGeneration:
    """Mixed in before an lm-eval model class (see model_class)."""

    prompt_format: PromptFormat
    generation_stats: dict[tuple[str, int], dict]  # (task, lm-eval doc_id) -> prompt_tokens_cut, hit_max_new_tokens
    _ended: dict[tuple[int, ...], bool]            # prompt ids as sent -> stopped at the budget

    def generate_until(self, requests, disable_tqdm: bool = False):
        mibe = [r for r in requests if r.task_name in TASKS]
        for request in mibe:
            context, gen_kwargs = request.args
            request.arguments = (self.prompt_format.apply(context), gen_kwargs)  # the samples log this prompt
        outputs = super().generate_until(requests, disable_tqdm=disable_tqdm)
        unmatched = 0
        for request in mibe:
            prompt, gen_kwargs = request.args
            room = self.max_length - int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(prompt)
            ended = self._ended.get(tuple(ids[-room:]))
            unmatched += ended is None
            self.generation_stats[(request.task_name, request.doc_id)] = {
                "prompt_tokens_cut": max(0, len(ids) - room), "hit_max_new_tokens": ended}
        if unmatched:
            log.warning("%d generation(s) could not be matched to their prompt's tokens: hit_max_new_tokens is "
                        "not known for their tasks (null)", unmatched)
        return outputs


@functools.cache
def model_class(backend: str) -> type:
    """lm-eval's model class for `backend` ("hf" or "vllm") with _MibeGeneration mixed in."""
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        class MibeHFLM(_MibeGeneration, HFLM):
            def _model_generate(self, context, max_length, stop, **generation_kwargs):
                mask = generation_kwargs.get("attention_mask")
                out = super()._model_generate(context, max_length, stop, **generation_kwargs)
                budget = max_length - context.shape[1]
                for row, generated in enumerate(out[:, context.shape[1]:].tolist()):
                    sent = context[row] if mask is None else context[row][mask[row].bool()]  # without left padding
                    self._ended[tuple(sent.tolist())] = (self.eot_token_id not in generated
                                                         and len(generated) >= budget)
                return out

        return MibeHFLM
    from lm_eval.models.vllm_causallms import VLLM

    class MibeVLLM(_MibeGeneration, VLLM):
        def _model_generate(self, requests, generate=False, sampling_params=None):
            outputs = super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
            if generate:
                for sent, output in zip(requests, outputs):
                    self._ended[tuple(sent)] = output.outputs[0].finish_reason == "length"
            return outputs

    return MibeVLLM


def load_model(backend: str, model_args: dict, run_args: dict, prompt_format: PromptFormat):
    """The lm-eval model object (what lm_eval.simple_evaluate would build from the same arguments)."""
    model = model_class(backend).create_from_arg_obj(model_args, run_args)
    model.prompt_format, model.generation_stats, model._ended = prompt_format, {}, {}
    return model
