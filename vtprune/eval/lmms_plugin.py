"""vtprune as an lmms-eval model: ``lmms-eval --model vtprune --model_args pretrained=...,method=fastervlm,
keep_ratio=0.1 --tasks ...`` runs any lmms-eval task on a pruned model (generation and log-likelihood).

Registered through lmms-eval 0.7's entry-point group ``lmms_eval.models`` (setup.cfg points it at
:func:`manifest`); lmms-eval itself stays optional. ``model_args``:

* ``pretrained``: ``toy``, a local folder or a hub id (as ``vtprune eval --model``);
* ``method``: a registered method name, or ``none`` (unpruned, the baseline); every other key that is not
  one of this class's own options (``device``, ``dtype``, ``max_new_tokens``) is an option of the method
  (``keep_ratio=0.1``, ``layer=2``...), validated by the method's config;
* ``config``: a JSON file with a setting (what ``vtprune search`` writes), instead of ``method``.

Requests are answered one at a time (``batch_size`` is accepted and ignored): a pruned batch is left-padded
per sample, so batching changes nothing but speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lmms_eval.api.model import lmms

from ..api import wrap
from ..errors import UsageError
from .models import load_model

__all__ = ["VTPruneLMM", "manifest"]


def manifest():
    """lmms-eval's ``ModelManifest`` of this model (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtprune", simple_class_path=f"{__name__}.VTPruneLMM")


class VTPruneLMM(lmms):
    """An lmms-eval ``simple`` model: a transformers VLM loaded by vtprune and wrapped with one setting."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "toy",
        method: str = "none",
        config: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_new_tokens: int = 32,
        batch_size: int | str = 1,
        **options,
    ) -> None:
        super().__init__()
        self.model, self.processor, self.prompt_fn = load_model(str(pretrained), device=device, dtype=dtype)
        self.device = torch.device(device)
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if config is not None:
            if method != "none" or options:
                raise UsageError("model_args: pass config=<file.json> alone, or method=... with its options")
            setting = json.loads(Path(config).read_text())
        elif method != "none":
            setting = {"method": method, **options}
        elif options:
            raise UsageError(
                f"model_args {sorted(options)} need method=<name> (method=none takes no options)"
            )
        else:
            setting = None
        self.setting = setting
        if setting is not None:
            wrap(self.model, setting)

    # ------------------------------------------------------------------------------------ helpers
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if v is not None]

    def _inputs(self, text: str, images: list) -> dict:
        inputs = self.processor(images=images or None, text=[text], return_tensors="pt")
        dtype = self.model.dtype
        return {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in inputs.items()
        }

    # ------------------------------------------------------------------------------------ requests
    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, as the task asks) answers, cut at the task's first ``until`` string."""
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = self._inputs(self.prompt_fn(self.processor, context, len(images)), images)
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.pop("temperature", 0) or 0)
            kwargs = {
                "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
                "do_sample": temperature > 0,
            }
            if temperature > 0:
                kwargs["temperature"] = temperature
                if gen_kwargs.get("top_p") is not None:
                    kwargs["top_p"] = float(gen_kwargs["top_p"])
            with torch.inference_mode():
                ids = self.model.generate(**inputs, **kwargs)
            text = self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text.strip())
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(loss, whether greedy decoding yields the continuation)`` per request, where ``loss`` is the
        mean negative log-likelihood of the continuation's tokens: what lmms-eval's own HF models return
        (``outputs.loss``) and what its multiple-choice scoring expects (it picks the *lowest* value), not
        the log-probability its docstring names. Scored on the pruned prompt: the wrapped model's logits are
        right-aligned and the continuation is the prompt's last text, so its tokens are the last columns."""
        out = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id] if not isinstance(doc_to_target, str) else None
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self.prompt_fn(self.processor, context, len(images))
            n_prompt = self._inputs(prompt, images)["input_ids"].shape[1]
            inputs = self._inputs(prompt + continuation, images)
            ids = inputs["input_ids"][0]
            k = ids.shape[0] - n_prompt
            if k < 1 or not torch.equal(self._inputs(prompt, images)["input_ids"][0], ids[:n_prompt]):
                raise UsageError(
                    f"continuation {continuation!r} does not tokenize as its own tokens after the prompt; "
                    "the task's target must extend the prompt"
                )
            with torch.inference_mode():
                logits = self.model(**inputs).logits[0, -k - 1 : -1].float()
            target = ids[-k:].to(logits.device)
            loss = -torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean()
            greedy = bool((logits.argmax(-1) == target).all())
            out.append((float(loss), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), out[-1])
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtprune's lmms-eval model answers single-round tasks only")
