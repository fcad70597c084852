#!/usr/bin/env python3
"""A producer for llmq that uses nothing but redis-py.

    python3 producer.py --redis redis://127.0.0.1:6379 --jobs 10

It pushes jobs with one XADD each and waits for every result with BLPOP on
llmq:done:<id>, then reads llmq:result:<id>. Exit code 0 when every job
succeeded, 1 otherwise. This file is the producer contract in executable form.
"""

import argparse
import json
import sys
import uuid

import redis


def push(r, job, lane="normal"):
    """Enqueue one job; returns its id."""
    job.setdefault("id", str(uuid.uuid4()))
    r.xadd("llmq:{jobs}:" + lane, {"job": json.dumps(job)})
    return job["id"]


def wait(r, job_id, timeout=60):
    """Block until the job has a result; returns the result dict or None.

    Reads the result first (the done marker may have been taken by another
    waiter), else BLPOPs llmq:done:<id> and puts the marker back, with the
    result's TTL, for any other waiter.
    """
    result_key = "llmq:result:" + job_id
    done_key = "llmq:done:" + job_id
    raw = r.get(result_key)
    if raw is None:
        popped = r.blpop([done_key], timeout=timeout)
        if popped is None:
            return None
        raw = r.get(result_key)
        ttl = r.pttl(result_key)
        if ttl and ttl > 0:
            r.lpush(done_key, popped[1])
            r.pexpire(done_key, ttl)
    return json.loads(raw) if raw else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379")
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--timeout", type=int, default=60)
    args = ap.parse_args()

    r = redis.Redis.from_url(args.redis, decode_responses=True)
    ids = []
    for i in range(args.jobs):
        job = {
            "messages": [{"role": "user", "content": f"python job {i}"}],
            "max_tokens": 16,
            "metadata": {"from": "python", "n": i},
        }
        if args.model:
            job["model"] = args.model
        ids.append(push(r, job, lane=["high", "normal", "low"][i % 3]))

    ok = 0
    for job_id in ids:
        res = wait(r, job_id, args.timeout)
        if res is None:
            print(f"{job_id}: no result within {args.timeout}s")
            continue
        if res.get("status") == "succeeded":
            print(f"{job_id}: succeeded via {res.get('provider')}/{res.get('model')} "
                  f"key={res.get('key')} tier={res.get('tier')} -> {res.get('output')!r}")
            if (res.get("metadata") or {}).get("from") == "python":
                ok += 1
        else:
            err = res.get("error") or {}
            print(f"{job_id}: failed ({err.get('kind')}): {err.get('message')}")
    print(f"{ok} of {len(ids)} succeeded")
    return 0 if ok == len(ids) else 1


if __name__ == "__main__":
    sys.exit(main())
