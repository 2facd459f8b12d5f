#!/usr/bin/env python
"""The neural-forecasting pipeline on the zebrafish recording at its native 2.2 Hz.

Checkpoint used for the recorded numbers (trained on core 1 of the 2-core box, ~16 minutes in all):

    calm prepare --output_dir /tmp/zf/trials --npz ../shared/data/triplett2018_zf_tectum_spont/zf_20151104-f1.npz --trial_seconds 20
    calm train-tokenizer --trials_dataset /tmp/zf/trials --output_dir /tmp/zf/tok --preset cpu --max_steps 300 \
        --per_device_train_batch_size 128 --learning_rate 2e-3 --report_to none --use_cpu --save_strategy no
    calm tokenize --tokenizer_path /tmp/zf/tok --trials_dataset /tmp/zf/trials --output_dir /tmp/zf/tokenized
    calm pretrain --tokenized_dataset /tmp/zf/tokenized --tokenizer_path /tmp/zf/tok --output_dir /tmp/zf/calm \
        --preset cpu --max_steps 240 --per_device_train_batch_size 8 --learning_rate 1e-3 --max_neurons 64 \
        --forecast_eval_trials 0 --report_to none --use_cpu --save_strategy no --eval_strategy no
    python benchmarks/pipeline_zebrafish_native_rate.py /tmp/zf/calm /tmp/zf/trials

Protocol: the prepared split's 14 test trials (20 s = 44 raw frames each); the pipeline gets the first 18 raw frames
(8.2 s, ~40 model frames) at 2.2 Hz and forecasts the remaining 26 (11.8 s) at 2.2 Hz; Pearson r per neuron over the
horizon, averaged over neurons then trials. Reference: a population ridge AR fitted on the raw-rate z-scored training
trials with the same context and horizon.
"""
import json
import sys
import time
import warnings

import numpy as np
import torch
from transformers import pipeline
from calm_hf.data import default_data_dir, load_npz_recording, load_session_metadata
from calm_hf.metrics.functional import forecast_pearson_r
from calm_hf.baselines.forecasting import RidgeARForecaster

ckpt, trials_dir = sys.argv[1], sys.argv[2]
rec = load_npz_recording(default_data_dir() / "triplett2018_zf_tectum_spont" / "zf_20151104-f1.npz")
info = load_session_metadata(trials_dir)[0]
L, CTX = 44, 18                      # 20 s trials at 2.2 Hz; 18 frames = 8.2 s context (~40 model frames)
H = L - CTX                           # 26 frames = 11.8 s horizon
test = np.asarray(info.splits["test"]); train = np.asarray(info.splits["train"]); val = np.asarray(info.splits["validation"])
raw = rec.traces.astype(np.float64)
trial = lambda i: raw[:, i * L:(i + 1) * L]
ctx = np.stack([trial(i)[:, :CTX] for i in test]); truth = np.stack([trial(i)[:, CTX:] for i in test])
f = pipeline("neural-forecasting", model=ckpt)
mean, std = info.stats.mean, info.stats.std   # training-trial statistics (raw units, model rate)
res = {}
for label, kw in [("greedy_context_stats", dict()), ("greedy_train_stats", dict(mean=mean, std=std)),
                  ("soft_train_stats", dict(mean=mean, std=std, mode="soft")),
                  ("sample_mean16_train_stats", dict(mean=mean, std=std, num_samples=16))]:
    torch.manual_seed(0); t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = f(ctx, sampling_rate=rec.fs, horizon=H, session=info.name, batch_size=8, **kw)
    pred = np.stack([o["forecast"] for o in out])
    res[label] = round(float(forecast_pearson_r(pred, truth)["pearson_r"]), 4)
    print(label, res[label], f"{time.time()-t0:.1f}s", flush=True)
# like-for-like linear bar at 2.2 Hz: ridge AR per session on z-scored raw-rate trials
z = lambda idx: np.stack([(trial(i) - rec.traces.mean(1, keepdims=True)) / rec.traces.std(1, keepdims=True) for i in idx]).astype(np.float32)
ridge = RidgeARForecaster(context=CTX); ridge.fit(z(train), z(val))
pr = ridge.predict(z(test)[..., :CTX], H)
res["ridge_ar_2.2Hz"] = round(float(forecast_pearson_r(pr, z(test)[..., CTX:])["pearson_r"]), 4)
print(json.dumps(res))
