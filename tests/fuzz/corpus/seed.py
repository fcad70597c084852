#!/usr/bin/env python3
"""Seeds the fuzz corpus from the repository's own inputs.

Run from the repository root: python3 tests/fuzz/corpus/seed.py
It rewrites the generated files (fx-*, example-*) and leaves hand-written
ones (hand-*) and crash inputs (crash-*) alone.
"""
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(ROOT, "..", "..", ".."))


def out(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w", encoding="utf-8") as f:
        f.write(data)


def clean(target, prefixes=("fx-", "example-")):
    d = os.path.join(ROOT, target)
    for p in glob.glob(os.path.join(d, "*")):
        if os.path.basename(p).startswith(prefixes):
            os.remove(p)


for plugin in ("openai", "anthropic", "gemini"):
    for call in ("parse", "prepare"):
        clean(f"{plugin}_{call}")
    clean("job")
for plugin in ("openai", "anthropic", "gemini"):
    for path in sorted(glob.glob(os.path.join(REPO, "plugins", plugin, "fixtures", "*.json"))):
        fx = json.load(open(path, encoding="utf-8"))
        name = "fx-" + os.path.basename(path)
        call = fx["call"]
        # The plugin's own input, exactly as the host sends it.
        out(f"{plugin}_{call}", name, json.dumps(fx["input"], ensure_ascii=False))
        if call == "prepare":
            # The same request as a producer's job.
            req = fx["input"]["request"]
            job = {"id": f"fx-{plugin}-{os.path.basename(path)[:-5]}", "messages": req["messages"], "model": req["model"]}
            for k in ("max_tokens", "temperature"):
                if req.get(k) is not None:
                    job[k] = req[k]
            if req.get("json"):
                job["require"] = ["json"]
            out("job", f"fx-{plugin}-{os.path.basename(path)}", json.dumps(job, ensure_ascii=False))

clean("config")
# catalog.toml is the base layer of every load already; as a user file it
# only makes each case slower.
for path in [os.path.join(REPO, "config", "llmq.toml")]:
    out("config", "example-" + os.path.basename(path), open(path, encoding="utf-8").read())

clean("env_keys")
example = open(os.path.join(REPO, "config", "keys.env.example"), encoding="utf-8").read()
out("env_keys", "example-keys.env", example)
# The same file with every value marked as a fuzz secret, so the target can
# check that no secret reaches an error, a report or a Debug form.
marked = re.sub(r"^([A-Z0-9_]+_API_KEYS?(?:_[0-9]+)?)=(.+)$", lambda m: f"{m.group(1)}={m.group(2).replace('test', 'FUZZ')}", example, flags=re.M)
out("env_keys", "example-keys-marked.env", marked)
