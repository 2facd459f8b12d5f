"""Input checks of the CalM tokenizer (`CalmTokenizer.encode`, `decode` and `forward`), each with the fix in its
message. `modeling_calm_tokenizer.py` imports this file relatively, so `save_pretrained` copies it with the remote
code."""

from __future__ import annotations

import torch


def check_input_values(input_values: torch.Tensor, window_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Traces for `CalmTokenizer.encode` / `forward`: a real tensor `(batch, neurons, frames)` with at least one token
    window, frames a multiple of `window_size`, finite in the model's `dtype`; returned cast to `dtype`."""
    if not isinstance(input_values, torch.Tensor):
        raise ValueError(
            f"`input_values` must be a torch.Tensor of shape (batch, neurons, frames), got "
            f"{type(input_values).__name__}; convert with torch.as_tensor(x, dtype=torch.float32)."
        )
    if input_values.ndim != 3:
        raise ValueError(
            f"`input_values` must be 3-D (batch, neurons, frames), got shape {tuple(input_values.shape)}. "
            "A single trace needs x[None, None]; a (neurons, frames) recording needs x[None]."
        )
    if input_values.numel() == 0:
        raise ValueError(
            f"`input_values` is empty (shape {tuple(input_values.shape)}); pass at least one neuron with "
            f"{window_size} or more frames."
        )
    frames = input_values.shape[-1]
    window = window_size
    if frames < window:
        raise ValueError(
            f"`input_values` has {frames} frames, fewer than one token window (window_size={window}); "
            f"pass at least {window} frames."
        )
    if frames % window != 0:
        usable = frames - frames % window
        raise ValueError(
            f"`input_values` has {frames} frames, not a multiple of window_size={window}; "
            f"crop to {usable} frames, e.g. x[..., :{usable}]."
        )
    if torch.is_complex(input_values) or input_values.dtype == torch.bool:
        # a complex->real cast silently drops the imaginary part; booleans are masks, not traces
        raise ValueError(
            f"`input_values` must be a real float tensor of traces, got dtype {input_values.dtype}; pass e.g. "
            "x.real.float() or x.abs().float() explicitly if that is what you mean."
        )
    source_finite = torch.isfinite(input_values)
    # check finiteness *after* the cast: float64 values beyond the model dtype's range become +-inf there
    input_values = input_values.to(dtype)
    finite = torch.isfinite(input_values)
    if not bool(finite.all()):
        batch_index, neuron_index, frame_index = (~finite).nonzero()[0].tolist()
        bad_count = int((~finite).sum())
        overflow = bool(source_finite.all())
        cause = f"value(s) beyond the range of {dtype}" if overflow else "NaN/Inf value(s)"
        raise ValueError(
            f"`input_values` contains {bad_count} {cause}, first at batch index {batch_index}, neuron "
            f"{neuron_index}, frame {frame_index}; "
            + ("z-score the traces first (encode expects per-neuron z-scored values)." if overflow else
               "interpolate or drop that neuron (or use torch.nan_to_num) before tokenizing.")
        )
    return input_values

def check_encoder_states(latents: torch.Tensor, input_values: torch.Tensor) -> None:
    """Huge but finite inputs (|x| ~ 1e30) overflow inside the encoder; nearest-code search on NaN/Inf states
    returns code 0 everywhere, a silent wrong answer, so refuse them with the scale that caused it."""
    if not bool(torch.isfinite(latents).all()):
        peak = float(input_values.abs().max())
        raise ValueError(
            f"The encoder produced non-finite states for `input_values` with max |x| = {peak:.3g}: the traces "
            "are far outside the z-scored range the tokenizer was trained on. Z-score each neuron first "
            "(calm_hf.data.ZScoreStats) or use the neural-forecasting pipeline, which does it for you."
        )

def check_codes(codes: torch.Tensor, codebook_size: int) -> torch.LongTensor:
    """Codes for `CalmTokenizer.decode`: an integer tensor `(batch, neurons, token_steps)` inside the codebook."""
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"`codes` must be a torch.LongTensor (batch, neurons, token_steps), got {type(codes).__name__}.")
    if torch.is_floating_point(codes) or codes.dtype == torch.bool or torch.is_complex(codes):
        raise ValueError(
            f"`codes` must be an integer tensor, got dtype {codes.dtype}; decode() takes tokens from encode(), "
            "not trace values."
        )
    if codes.ndim != 3:
        raise ValueError(
            f"`codes` must be 3-D (batch, neurons, token_steps), got shape {tuple(codes.shape)}; "
            "a single token sequence needs codes[None, None]."
        )
    if codes.numel() == 0:
        raise ValueError(f"`codes` is empty (shape {tuple(codes.shape)}); pass at least one token.")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(
            f"`codes` must lie in [0, {codebook_size - 1}] (codebook_size={codebook_size}), "
            f"got values from {low} to {high}; were they produced by a tokenizer with a different codebook?"
        )
    return codes.long()


__all__ = ["check_codes", "check_encoder_states", "check_input_values"]
