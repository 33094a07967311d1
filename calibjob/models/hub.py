"""Fetching real weights: every hub or file failure becomes one ModelUnavailable that says
what to do (log in and accept the licence, or pass --local-ckpt)."""

from __future__ import annotations

from calibjob.errors import ModelUnavailable


def first_sentence(text: str) -> str:
    """The first whole sentence of a (possibly multi-line) message, never cut mid-word."""
    flat = " ".join(text.split())
    if not flat:
        return ""
    for i, ch in enumerate(flat):
        if ch in ".!?" and (i + 1 == len(flat) or flat[i + 1] == " "):
            return flat[: i + 1]
    return flat + "."


def fetching(what: str, repo: str, fn, /, *args, **kwargs):
    """fn(*args, **kwargs), its failure told as one line naming the part and the way out."""
    try:
        return fn(*args, **kwargs)
    except ModelUnavailable:
        raise
    except Exception as e:  # hub errors come in many classes (offline, gated, 404, OSError)
        why = first_sentence(str(e))
        where = (
            "pass --local-ckpt PATH to a local MMDiT checkpoint (.safetensors)"
            if what in ("MMDiT", "VAE decoder")
            else "--local-ckpt replaces only the MMDiT checkpoint: the text encoders and "
            "tokenizers come from the Hugging Face cache (fill it on a machine with network and "
            "copy ~/.cache/huggingface, see the README)"
        )
        raise ModelUnavailable(
            f"cannot load the {what} of {repo} ({type(e).__name__}: {why}) Log in with "
            f"`huggingface-cli login` on a machine with network and accept the model's licence, "
            f"or {where}."
        ) from None
