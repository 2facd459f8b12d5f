#!/usr/bin/env python
"""Behaviour-decoding benchmark: CalM linear / GLU heads and the closed-form CalM ridge readout on a frozen backbone
vs GLM, RRR and TCN decoders.

    python benchmarks/behavior_benchmark.py            # full run, about 15 min on 2 CPU cores
    python benchmarks/behavior_benchmark.py --quick    # a few minutes: same pipeline, smaller budgets
    python benchmarks/behavior_benchmark.py --backbone calm-base   # heads on a pretrained (data-identity) backbone

Protocol
- Real data: the five Park et al. 2024 V1 sessions (one mouse each, 28-74 neurons), behaviour = pupil and running
  speed. Each session has 128 trials of 49 frames at 16 Hz; resampled to the model rate of 5 Hz a trial keeps only
  16 frames = 4 tokens, so the backbone sees very short contexts here. 70/15/15 random trial split per session; traces
  and behaviour z-scored per neuron / channel with training-trial statistics (`calm_hf.data.prepare_session`).
- Simulated data: sessions of the paper's rate-RNN simulator (100 frames = 25 tokens at 5 Hz) whose 3 behaviour
  channels are noisy linear readouts of the latent rates; same preparation.
- Backbone: a small CalmTokenizer and a CalmForCausalNeuralModeling are trained here, self-supervised (no behaviour),
  on the training trials of all sessions (Park + simulated), under a fixed CPU time budget (fp32: bf16 autocast was
  measured ~10x slower than fp32 for these small sizes on this CPU; `--bf16` turns it on). The
  causal checkpoint is then loaded with `CalmForBehaviorRegression.from_pretrained(..., num_behavior_channels=M,
  behavior_head=...)`: backbone frozen, head fresh.
- With `--backbone DIR` (e.g. calm-base) no backbone is trained: the checkpoint and its tokenizer are used as they are,
  each session's neurons get their data identity from the session's training trials, and the heads decode from its
  frozen hidden states (the heads' neuron-weight banks still index each session's neurons).
- Heads: trained with AdamW on the training trials (MSE) with the packaged behaviour recipe
  (`calm_hf/recipes/behavior.json`, the defaults of `calm finetune-behavior`; adaptation without weight decay), early
  stopping on validation MSE; the frozen backbone's
  hidden states are computed once and fed through `backbone_hidden_states` (checked equal to the full forward).
- CalM-ridge (`calm_hf.behavior_readout.CalmBehaviorRidgeReadout`): closed-form ridge from causal lags of the
  z-scored traces plus the frozen backbone's hidden state of the last token complete at the frame (reduced over
  neurons: mean and std, or a per-neuron PCA); the number of lags, the reduction, PCA size, the backbone block's
  weight and the per-channel penalty are chosen on the validation trials. "Ridge traces-only" is the same decoder and
  search without the backbone block (the ablation that measures the backbone's contribution).
  "CalM-ridge look-ahead*" reads the token holding the frame instead, as the linear/GLU heads do (not causal).
- Baselines (calm_hf.baselines.behavior) on the same z-scored traces at the same 5 Hz rate: ridge GLM on 4 causal lags,
  reduced-rank ridge regression, causal TCN; each picks its hyperparameters on the validation trials.
- Scores on the test trials: per session and channel, R^2 over all trial-frames and MSE (behaviour in z-units).
- Multi-session (Park): the head is trained on four sessions, then only the fifth session's rows of its neuron-weight
  bank are trained on that session's training trials (`train_only_session_neurons`); every session takes a turn.
- Timing caveat: a CalM-linear/GLU prediction for a frame reads the hidden state of the token holding that frame, so it
  has seen up to 3 frames (0.6 s) after it within the token; CalM-ridge, its traces-only ablation and the baselines
  are strictly causal (frames <= t); CalM-ridge look-ahead* is not.

Writes benchmarks/results/behavior.json and behavior.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers

from calm_hf.baselines.behavior import ReducedRankDecoder, RidgeGLMDecoder, TCNDecoder
from calm_hf.behavior_readout import CalmBehaviorRidgeReadout
from calm_hf.commands.recipes import load_behavior_recipe
from calm_hf.configuration_calm import CalmConfig
from calm_hf.configuration_calm_tokenizer import CalmTokenizerConfig
from calm_hf.data import PreparedSession, default_data_dir, load_park_sessions, prepare_session, simulate_benchmark
from calm_hf.metrics.functional import mse, r2_score
from calm_hf.modeling_calm import CalmForCausalNeuralModeling
from calm_hf.modeling_calm_behavior import CalmForBehaviorRegression
from calm_hf.modeling_calm_tokenizer import CalmTokenizer

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_RATE = 5.0
WINDOW = 4
LOOKAHEAD_RIDGE = "CalM-ridge look-ahead*"  # reads the token holding the frame: not strictly causal
MODELS = ("CalM-linear", "CalM-GLU", "CalM-ridge", "Ridge traces-only", "GLM", "RRR", "TCN", LOOKAHEAD_RIDGE)

BUDGETS = {
    # seconds / sizes; "quick" proves the pipeline end to end in a few minutes
    "quick": {"sim_sessions": 1, "sim_neurons": 60, "sim_trials": 80, "tokenizer_s": 15, "backbone_s": 40,
              "head_s": 6, "adapt_s": 4, "tcn_s": 4, "held_out": 1, "hidden_size": 64, "layers": 2, "sim_batch": 4},
    "full": {"sim_sessions": 2, "sim_neurons": 100, "sim_trials": 200, "tokenizer_s": 90, "backbone_s": 240,
             "head_s": 15, "adapt_s": 8, "tcn_s": 12, "held_out": 5, "hidden_size": 64, "layers": 2, "sim_batch": 4},
}


@dataclass
class Session:
    """One session as the benchmark uses it: prepared trials, its ids in the backbone, codes and cached features."""

    name: str
    kind: str  # "park" | "simulated"
    prepared: PreparedSession
    session_id: int = 0
    neuron_offset: int = 0
    codes: torch.Tensor | None = None  # (trials, neurons, token_steps) long
    hidden: torch.Tensor | None = None  # (trials, neurons, token_steps, hidden): frozen backbone output
    channel_names: list[str] = field(default_factory=list)

    @property
    def neuron_ids(self) -> torch.Tensor:
        return torch.arange(self.neuron_offset, self.neuron_offset + self.prepared.num_neurons)

    def split(self, name: str) -> np.ndarray:
        return self.prepared.splits[name]

    def behavior(self, split: str) -> np.ndarray:
        return self.prepared.behavior[self.split(split)]


BF16 = False  # set by --bf16


def autocast():
    # bf16 autocast measured ~10x SLOWER than fp32 for these small DAT sizes on this CPU (hidden 64-128), so the
    # benchmark runs in fp32 unless --bf16 is given
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_sessions(data_dir: Path, budget: dict, seed: int) -> list[Session]:
    sessions = []
    for raw in load_park_sessions(data_dir):
        prepared = prepare_session(raw, target_fs=MODEL_RATE, split_seed=seed, window_size=WINDOW)
        names = [name.split(" ")[0].removesuffix("_norm") for name in prepared.behavior_names]
        sessions.append(Session(raw.name, "park", prepared, channel_names=names))
    simulated = simulate_benchmark(
        num_sessions=budget["sim_sessions"], seed=100 + seed, num_neurons=budget["sim_neurons"],
        num_trials=budget["sim_trials"], num_steps=100,
    )
    for raw in simulated:
        prepared = prepare_session(raw, target_fs=MODEL_RATE, split_seed=seed, window_size=WINDOW)
        sessions.append(Session(raw.name, "simulated", prepared, channel_names=list(prepared.behavior_names)))
    offset = 0
    for session_id, session in enumerate(sessions):
        session.session_id, session.neuron_offset = session_id, offset
        offset += session.prepared.num_neurons
    return sessions


# ----------------------------------------------------------------------------------------------------------------------
# Backbone: tokenizer + dual-axis transformer, self-supervised, time-bounded
# ----------------------------------------------------------------------------------------------------------------------


def train_tokenizer(sessions: list[Session], budget: dict, seed: int) -> tuple[CalmTokenizer, dict]:
    """CalmTokenizer on single-neuron training traces (Park trials of 16 frames, simulated crops of 48 frames)."""
    rng = np.random.default_rng(seed)
    pools = {}
    for kind, frames in (("park", 16), ("simulated", 48)):
        traces = [s.prepared.traces[s.split("train")].reshape(-1, s.prepared.num_frames) for s in sessions if s.kind == kind]
        pools[kind] = (np.concatenate(traces), frames)
    torch.manual_seed(seed)
    config = CalmTokenizerConfig.from_preset(
        "cpu", hidden_size=64, intermediate_size=256, codebook_size=64, codebook_warmup_steps=30,
        gumbel_anneal_steps=300, revival_interval=50, revival_queue_size=2048,
    )
    model = CalmTokenizer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < budget["tokenizer_s"]:
        traces, frames = pools["park" if step % 2 == 0 else "simulated"]
        rows = rng.integers(0, len(traces), 128)
        begin = rng.integers(0, traces.shape[1] - frames + 1)
        batch = torch.as_tensor(traces[rows, None, begin : begin + frames])
        with autocast():
            outputs = model(input_values=batch)
        loss = outputs.loss
        optimizer.zero_grad()
        loss.backward()
        model.update_codebook_state(outputs)  # EMA codebook, revival, k-means seeding (what CalmTrainer's callback does)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
    model.eval()
    return model, {"steps": step, "seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-20:])),
                   "hidden_size": config.hidden_size, "codebook_size": config.codebook_size}


@torch.no_grad()
def tokenize(tokenizer: CalmTokenizer, sessions: list[Session]) -> dict:
    used = set()
    for session in sessions:
        traces = torch.as_tensor(session.prepared.traces)
        codes = torch.cat([tokenizer.encode(traces[i : i + 32]).codes for i in range(0, len(traces), 32)])
        session.codes = codes.long()
        used |= set(np.unique(codes.numpy()).tolist())
    return {"codes_used": len(used)}


def pretrain_backbone(sessions: list[Session], tokenizer: CalmTokenizer, budget: dict, seed: int):
    """CalmForCausalNeuralModeling on the training trials of every session (next-token CE plus the continuous head's
    MSE, the preset's objective), time-bounded."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hidden = budget["hidden_size"]
    config = CalmConfig.from_preset(
        "cpu", vocab_size=tokenizer.config.codebook_size, hidden_size=hidden, num_hidden_layers=budget["layers"],
        num_attention_heads=4, intermediate_size=4 * hidden, neighbor_k=8, max_token_steps=32, window_size=WINDOW,
        num_neurons=sum(s.prepared.num_neurons for s in sessions), num_sessions=len(sessions),
        session_names=[s.name for s in sessions],
        session_neuron_ranges=[[s.neuron_offset, s.neuron_offset + s.prepared.num_neurons] for s in sessions],
        neuron_identity="table", quantile_levels=None,  # this run's own backbone learns a table row per neuron
    )
    model = CalmForCausalNeuralModeling(config)
    model.set_codebook_neighbors(tokenizer.get_codebook())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup, start, step, losses = 30, time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < budget["backbone_s"]:
        for group in optimizer.param_groups:  # warmup, then cosine over the time budget
            group["lr"] = 2e-3 * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget["backbone_s"]))
        session = sessions[rng.integers(len(sessions))]
        batch_size = 32 if session.kind == "park" else budget["sim_batch"]
        index = rng.choice(session.split("train"), batch_size, replace=False)
        input_ids = session.codes[index]
        # the continuous forecast head's targets (the preset's default objective): the z-scored traces
        frames = input_ids.shape[-1] * WINDOW
        values = torch.as_tensor(session.prepared.traces[index][..., :frames], dtype=torch.float32)
        with autocast():
            loss = model(
                input_ids=input_ids, neuron_ids=session.neuron_ids.expand(batch_size, -1),
                session_ids=torch.full((batch_size,), session.session_id), labels=input_ids,
                value_labels=values if model.config.value_head_steps > 0 else None,
            ).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
    model.eval()
    validation = {}
    with torch.no_grad(), autocast():
        for kind in ("park", "simulated"):
            values = []
            for session in (s for s in sessions if s.kind == kind):
                index = session.split("validation")
                values.append(float(model(
                    input_ids=session.codes[index], neuron_ids=session.neuron_ids.expand(len(index), -1),
                    session_ids=torch.full((len(index),), session.session_id), labels=session.codes[index],
                ).loss))
            validation[kind] = float(np.mean(values))
    info = {"steps": step, "seconds": time.perf_counter() - start, "final_train_loss": float(np.mean(losses[-20:])),
            "validation_loss": validation, "chance_loss": math.log(config.vocab_size),
            "parameters": model.num_parameters(), "hidden_size": hidden, "layers": config.num_hidden_layers}
    return model, info


def session_identity(model, session: Session) -> dict:
    """`{"neuron_identity": ...}` of a data-identity backbone (from the session's training trials), else `{}`."""
    if model.config.neuron_identity != "data":
        return {}
    from calm_hf.identity_calm import compute_neuron_identity, identity_settings

    reference = torch.as_tensor(session.prepared.traces[session.split("train")])
    identity = compute_neuron_identity(reference, session.prepared.num_neurons, **identity_settings(model.config))
    return {"neuron_identity": identity}


@torch.no_grad()
def cache_hidden_states(model: CalmForBehaviorRegression, sessions: list[Session]) -> None:
    """Frozen backbone output of every trial, computed once (stored in bf16 under --bf16)."""
    for session in sessions:
        parts = []
        identity = session_identity(model, session)
        for begin in range(0, len(session.codes), 16):
            codes = session.codes[begin : begin + 16]
            extra = {k: v.expand(len(codes), -1, -1) for k, v in identity.items()}
            with autocast():
                parts.append(model.model(
                    input_ids=codes, neuron_ids=session.neuron_ids.expand(len(codes), -1),
                    session_ids=torch.full((len(codes),), session.session_id), use_cache=False, **extra,
                ).last_hidden_state.to(torch.bfloat16 if BF16 else torch.float32))
        session.hidden = torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------------


def head_inputs(session: Session, index: np.ndarray) -> dict:
    return {
        "backbone_hidden_states": session.hidden[index].float(),
        "neuron_ids": session.neuron_ids.expand(len(index), -1),
        "session_ids": torch.full((len(index),), session.session_id),
    }


@torch.no_grad()
def predict(model: CalmForBehaviorRegression, session: Session, split: str) -> np.ndarray:
    model.eval()
    return model(**head_inputs(session, session.split(split))).predictions.numpy()


def validation_mse(model: CalmForBehaviorRegression, sessions: list[Session]) -> float:
    errors = [((predict(model, s, "validation") - s.behavior("validation")) ** 2).ravel() for s in sessions]
    return float(np.concatenate(errors).mean())


RECIPE = load_behavior_recipe()  # learning rate, weight decay, batch, patience, epochs: what `calm finetune-behavior` uses


def fit_head(model: CalmForBehaviorRegression, sessions: list[Session], parameters: list[torch.nn.Parameter],
             seconds: float, seed: int, learning_rate: float = RECIPE["learning_rate"],
             weight_decay: float = RECIPE["weight_decay"], batch_size: int = RECIPE["batch_size"],
             patience: int = RECIPE["patience"], max_epochs: int = RECIPE["max_epochs"]) -> dict:
    """AdamW on the training trials of `sessions` (one session per batch), early stopping on validation MSE."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    best = (validation_mse(model, sessions), 0, copy.deepcopy(model.state_dict()))
    start, epoch = time.perf_counter(), 0
    while epoch < max_epochs and time.perf_counter() - start < seconds and epoch - best[1] < patience:
        epoch += 1
        batches = [(s, chunk) for s in sessions
                   for chunk in np.array_split(rng.permutation(s.split("train")), max(1, len(s.split("train")) // batch_size))]
        model.train()
        for order in rng.permutation(len(batches)):
            session, index = batches[order]
            labels = torch.as_tensor(session.prepared.behavior[index])
            loss = model(**head_inputs(session, index), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = validation_mse(model, sessions)
        if score < best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return {"epochs": epoch, "best_epoch": best[1], "val_mse": best[0], "seconds": time.perf_counter() - start}


def new_head(checkpoint: str, head: str, channels: int, seed: int) -> CalmForBehaviorRegression:
    torch.manual_seed(seed)
    return CalmForBehaviorRegression.from_pretrained(checkpoint, num_behavior_channels=channels, behavior_head=head)


def score_rows(session: Session, model_name: str, pred: np.ndarray, extra: dict | None = None) -> list[dict]:
    truth = session.behavior("test")
    r2 = r2_score(pred.transpose(0, 2, 1), truth.transpose(0, 2, 1))
    return [
        {"session": session.name, "channel": channel, "model": model_name, "r2": float(r2[c]),
         "mse": mse(pred[:, c], truth[:, c]), **(extra or {})}
        for c, channel in enumerate(session.channel_names)
    ]


def single_session(session: Session, checkpoints: dict, budget: dict, seed: int) -> tuple[list[dict], dict]:
    rows, log = [], {}
    for head, name in (("linear", "CalM-linear"), ("glu", "CalM-GLU")):
        model = new_head(checkpoints[session.kind], head, session.prepared.behavior.shape[1], seed)
        log[name] = fit_head(model, [session], [p for p in model.parameters() if p.requires_grad], budget["head_s"],
                             seed=seed)
        rows += score_rows(session, name, predict(model, session, "test"))
    p = session.prepared
    hidden = {split: session.hidden[session.split(split)].float().numpy() for split in ("train", "validation", "test")}
    traces = {split: p.traces[session.split(split)] for split in ("train", "validation", "test")}
    ridges = {"CalM-ridge": CalmBehaviorRidgeReadout(window_size=WINDOW),
              "Ridge traces-only": CalmBehaviorRidgeReadout(reductions=(), window_size=WINDOW),
              LOOKAHEAD_RIDGE: CalmBehaviorRidgeReadout(window_size=WINDOW, causal=False)}
    for name, readout in ridges.items():
        begin = time.perf_counter()
        readout.fit(traces["train"], session.behavior("train"), traces["validation"], session.behavior("validation"),
                    hidden["train"], hidden["validation"])
        log[name] = {"chosen": readout.search_log_["chosen"], "seconds": time.perf_counter() - begin}
        rows += score_rows(session, name, readout.predict(traces["test"], hidden["test"]))
    data = [p.traces[session.split(s)] for s in ("train", "train", "validation", "validation")]
    targets = [p.behavior[session.split(s)] for s in ("train", "validation")]
    baselines = {"GLM": RidgeGLMDecoder(lags=4), "RRR": ReducedRankDecoder(lags=4),
                 "TCN": TCNDecoder(max_seconds=budget["tcn_s"], bf16=BF16, seed=seed)}
    for name, decoder in baselines.items():
        begin = time.perf_counter()
        decoder.fit(data[0], targets[0], data[2], targets[1])
        log[name] = {"chosen": decoder.search_log_.get("chosen"), "seconds": time.perf_counter() - begin}
        rows += score_rows(session, name, decoder.predict(p.traces[session.split("test")]))
    return rows, log


def multi_session(park: list[Session], checkpoint: str, budget: dict, seed: int) -> tuple[list[dict], dict]:
    """Head on four Park sessions, then only the fifth session's bank rows trained on its own trials."""
    rows, log = [], {}
    for held_out in park[: budget["held_out"]]:
        others = [s for s in park if s is not held_out]
        for head, name in (("linear", "CalM-linear"), ("glu", "CalM-GLU")):
            model = new_head(checkpoint, head, held_out.prepared.behavior.shape[1], seed)
            shared = fit_head(model, others, [p for p in model.parameters() if p.requires_grad], budget["head_s"],
                              seed=seed)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            bank = model.train_only_session_neurons(held_out.neuron_ids)
            adapted = fit_head(model, [held_out], bank, budget["adapt_s"], weight_decay=0.0, seed=seed)
            after = model.state_dict()
            rows_bank = held_out.neuron_ids
            untouched = all(torch.equal(after[k], v) for k, v in before.items() if k != "behavior_head.neuron_weights")
            other_rows = torch.ones(len(after["behavior_head.neuron_weights"]), dtype=torch.bool)
            other_rows[rows_bank] = False
            untouched &= torch.equal(after["behavior_head.neuron_weights"][other_rows],
                                     before["behavior_head.neuron_weights"][other_rows])
            log[f"{held_out.name}/{name}"] = {"shared": shared, "adapted": adapted, "others_bit_identical": bool(untouched)}
            rows += score_rows(held_out, f"{name} (4 sessions + adapted)", predict(model, held_out, "test"))
    return rows, log


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def table(rows: list[dict], models: list[str], metric: str) -> list[str]:
    lookup = {(r["session"], r["channel"], r["model"]): r[metric] for r in rows}
    keys = list(dict.fromkeys((r["session"], r["channel"]) for r in rows))
    lines = [f"| session | channel | {' | '.join(models)} |", "|---|---|" + "---|" * len(models)]
    for session, channel in keys:
        values = [lookup.get((session, channel, m), float("nan")) for m in models]
        lines.append(f"| {session} | {channel} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    means = [np.nanmean([lookup.get((s, c, m), np.nan) for s, c in keys]) for m in models]
    lines.append("| **mean** | | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
    return lines


def markdown(result: dict) -> str:
    setup, backbone = result["setup"], result["backbone"]
    lines = [
        "# Behaviour decoding (CalmForBehaviorRegression)", "",
        f"{'Quick sanity run' if setup['quick'] else 'Full run'}, {setup['threads']} CPU threads for the backbone "
        f"({setup['head_threads']} for heads and baselines), "
        f"{'bf16' if setup['bf16'] else 'fp32'}, seed {setup['seed']}, "
        f"total {result['seconds'] / 60:.1f} min. Test-trial R^2 and MSE of z-scored behaviour at 5 Hz "
        "(R^2 per channel over all test trial-frames).", "",
        f"Backbone (self-supervised on the training trials of all sessions): tokenizer {backbone['tokenizer']['steps']} "
        f"steps in {backbone['tokenizer']['seconds']:.0f} s (codebook {backbone['tokenizer']['codebook_size']}, "
        f"{backbone['codes_used']} codes used); DAT hidden {backbone['dat']['hidden_size']}, {backbone['dat']['layers']} "
        f"layers, {backbone['dat']['steps']} steps in {backbone['dat']['seconds']:.0f} s, validation next-token loss "
        f"park {backbone['dat']['validation_loss']['park']:.3f} / simulated {backbone['dat']['validation_loss']['simulated']:.3f} "
        f"(chance {backbone['dat']['chance_loss']:.3f}).", "",
        "Park et al. trials are 49 frames at 16 Hz: at the model rate of 5 Hz only 16 frames = 4 tokens per trial. "
        "CalM-linear/GLU predictions read the token holding the frame (up to 3 frames of look-ahead inside the "
        "token). CalM-ridge (closed-form ridge on causal trace lags plus the frozen hidden state of the last complete "
        "token, `calm_hf.behavior_readout.CalmBehaviorRidgeReadout`; lags, reduction, PCA size, block weight and "
        "per-channel penalty chosen on validation) and its traces-only ablation are strictly causal, as are the "
        f"GLM/RRR/TCN baselines; `{LOOKAHEAD_RIDGE}` is CalM-ridge reading the token holding the frame (not causal, "
        "for comparison with the linear/GLU heads). `nan`: the channel is constant over the test trials (R^2 "
        "undefined; left out of the means).", "",
    ]
    for title, key in (("Park et al. 2024 V1 (real)", "park"), ("Simulated (rate RNN, linear behaviour readout)", "simulated")):
        for metric in ("r2", "mse"):
            lines += [f"## {title}: test {metric.upper()}", ""] + table(result[key], list(MODELS), metric) + [""]
    multi = result["multi_session"]
    if multi:
        models = ["CalM-linear (4 sessions + adapted)", "CalM-linear", "CalM-GLU (4 sessions + adapted)", "CalM-GLU"]
        single = [r for r in result["park"] if r["model"] in ("CalM-linear", "CalM-GLU")
                  and r["session"] in {m["session"] for m in multi}]
        lines += ["## Park multi-session: head on the other four sessions, only the held-out session's neuron weights "
                  "trained (test R^2; single-session heads for comparison)", ""]
        lines += table(multi + single, models, "r2") + [""]
        identical = all(v["others_bit_identical"] for v in result["logs"]["multi_session"].values())
        lines += [f"Every other weight bit-identical after adaptation: {identical}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few-minute sanity run (smaller budgets)")
    parser.add_argument("--data_dir", default=None, help="real recordings (default ../shared/data or $CALM_DATA_DIR)")
    parser.add_argument("--output", default=str(RESULTS / "behavior"), help="output path without suffix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 at these sizes here)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for tokenizer/backbone training")
    parser.add_argument("--backbone", default=None, help="a pretrained checkpoint (e.g. calm-base) to decode from "
                                                         "instead of training a backbone here")
    args = parser.parse_args(argv)
    global BF16
    BF16 = args.bf16
    transformers.logging.set_verbosity_error()  # one LOAD REPORT (fresh head) per fit otherwise
    transformers.logging.disable_progress_bar()
    budget = BUDGETS["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    sessions = load_sessions(data_dir, budget, args.seed)
    park = [s for s in sessions if s.kind == "park"]

    workdir = Path(tempfile.mkdtemp(prefix="calm-behavior-"))
    if args.backbone:  # decode from a pretrained checkpoint as it is
        tokenizer = CalmTokenizer.from_pretrained(Path(args.backbone) / "tokenizer").eval()
        tokenizer_info = {"steps": 0, "seconds": 0.0, "codebook_size": tokenizer.config.codebook_size,
                          "pretrained": args.backbone}
        codes_info = tokenize(tokenizer, sessions)
        causal = CalmForCausalNeuralModeling.from_pretrained(args.backbone)
        dat_info = {"steps": 0, "seconds": 0.0, "pretrained": args.backbone, "hidden_size": causal.config.hidden_size,
                    "layers": causal.config.num_hidden_layers, "validation_loss": {"park": float("nan"),
                                                                                   "simulated": float("nan")},
                    "chance_loss": math.log(causal.config.vocab_size)}
        checkpoint = args.backbone
    else:
        tokenizer, tokenizer_info = train_tokenizer(sessions, budget, args.seed)
        codes_info = tokenize(tokenizer, sessions)
        causal, dat_info = pretrain_backbone(sessions, tokenizer, budget, args.seed)
        causal.save_pretrained(workdir / "backbone")
        checkpoint = str(workdir / "backbone")
    checkpoints = {"park": checkpoint, "simulated": checkpoint}

    probe = new_head(checkpoint, "glu", 2, args.seed).eval()
    cache_hidden_states(probe, sessions)
    with torch.no_grad(), autocast():  # cached features reproduce the full forward (random bank: a real check)
        probe.behavior_head.neuron_weights.normal_()
        index = park[0].split("test")
        extra = {k: v.expand(len(index), -1, -1) for k, v in session_identity(probe, park[0]).items()}
        full = probe(input_ids=park[0].codes[index], neuron_ids=park[0].neuron_ids.expand(len(index), -1),
                     session_ids=torch.full((len(index),), park[0].session_id), **extra).predictions
        cached = probe(**{**head_inputs(park[0], index), "backbone_hidden_states": park[0].hidden[index]}).predictions
    np.testing.assert_allclose(full.float().numpy(), cached.float().numpy(), rtol=1e-4, atol=1e-4)

    result = {"park": [], "simulated": [], "multi_session": [], "logs": {"single_session": {}}}
    # heads and baselines are small ops: one thread is ~10-20x faster than two on this shared 2-core machine
    torch.set_num_threads(1)
    for session in sessions:
        rows, log = single_session(session, checkpoints, budget, args.seed)
        result[session.kind] += rows
        result["logs"]["single_session"][session.name] = log
        print(f"{session.name}: " + ", ".join(f"{r['model']}/{r['channel']} R2={r['r2']:.3f}" for r in rows), flush=True)
    result["multi_session"], result["logs"]["multi_session"] = multi_session(park, checkpoint, budget, args.seed)
    result["backbone"] = {"tokenizer": tokenizer_info, "dat": dat_info, **codes_info}
    result["setup"] = {
        "quick": args.quick, "seed": args.seed, "threads": args.threads, "head_threads": torch.get_num_threads(), "budget": budget, "bf16": BF16,
        "sessions": [{"name": s.name, "kind": s.kind, "neurons": s.prepared.num_neurons, "trials": s.prepared.num_trials,
                      "frames": s.prepared.num_frames, "token_steps": s.prepared.num_frames // WINDOW,
                      "channels": s.channel_names, "splits": {k: len(v) for k, v in s.prepared.splits.items()}}
                     for s in sessions],
    }
    shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
