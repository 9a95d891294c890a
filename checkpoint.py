"""The output directory of a training run: checkpoints, resume, and one live run at a time.

--out holds run_config.json (the resolved flags of the latest launch), metrics.jsonl and
samples.jsonl (one row per step), run.lock (the PID of the run writing here) and step-N/:
Hugging Face model files (the policy at the top, other trainables in sub-dirs; transformers, vLLM
and evaluate.py read them), resume/ (sharded model and optimizer state, torch.distributed.
checkpoint; resume.pt for a run without a process group), rng-R.pt per rank, and
trainer_state.json (step, world size, LR schedules, the state
of everything given to Run.track, the flags). A checkpoint is written to step-N.tmp and renamed
when complete; --keep-last N are kept.

Resuming checks, before any model loads: the world size is the checkpoint's; every flag that
changes the algorithm or the data order equals the checkpoint's (BOOKKEEPING flags may change;
--allow-flag-changes accepts the others, and says which). The logs then lose their rows past the
checkpoint's step, so each step appears once.
"""
import errno
import json
import os
import random
import shutil

import numpy as np
import torch

import model as M

# Flags that only change bookkeeping: they may differ when resuming.
BOOKKEEPING = {"out", "steps", "save_every", "keep_last", "samples_every", "val_every",
               "log_every", "wandb_project", "resume", "allow_flag_changes", "threads", "plan",
               "plan_world", "plan_device", "plan_prompt_tokens"}


def flag(dest: str) -> str:
    """The command-line spelling of an argparse destination (n is --num-samples)."""
    return "--num-samples" if dest == "n" else "--" + dest.replace("_", "-")


def checkpoints(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, n) for n in os.listdir(out)
                  if n.startswith("step-") and not n.endswith(".tmp"))


def has_run(out: str) -> bool:
    """A run logged a step or saved a checkpoint here (an empty metrics.jsonl is no run)."""
    metrics = os.path.join(out, "metrics.jsonl")
    return bool(checkpoints(out)) or (os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def take_lock(out: str):
    """Claim --out for this process (rank 0): refuse while another live process holds it."""
    path = os.path.join(out, "run.lock")
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _alive(pid):
        raise RuntimeError(f"--out {out}: another run (PID {pid}) is writing here ({path}); stop "
                           f"it or choose another --out")
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def release_lock(out: str):
    path = os.path.join(out, "run.lock")
    if os.path.exists(path):
        os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def find_resume(args, world: int) -> str | None:
    """The checkpoint to resume from (None: a fresh run), checked against this launch before any
    model loads: refuses an --out that already holds a run unless --resume is given, another world
    size, and flag changes that alter the run (see the module docstring)."""
    if not args.resume:
        if has_run(args.out):
            raise FileExistsError(f"--out {args.out} already holds a run: pass --resume auto to "
                                  f"continue it, or choose another --out")
        return None
    found = checkpoints(args.out) if args.resume == "auto" else [args.resume]
    if not found:
        return None
    path = found[-1]
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.exists(state_file):
        raise FileNotFoundError(f"--resume {path}: not a checkpoint (no trainer_state.json)")
    with open(state_file) as f:
        meta = json.load(f)
    saved_world = meta.get("world", len([n for n in os.listdir(path) if n.startswith("rng-")]))
    if saved_world != world:
        raise ValueError(f"--resume {path}: saved by {saved_world} ranks, this launch has {world}; "
                         f"resume with the world size the run was saved with")
    check_flags(meta["args"], vars(args), args.allow_flag_changes, path)
    return path


def check_flags(saved: dict, now: dict, allow: bool, path: str):
    changed = [k for k in sorted(saved) if k in now and k not in BOOKKEEPING and saved[k] != now[k]]
    if not changed:
        return
    listed = ", ".join(f"{flag(k)} {now[k]} (was {saved[k]})" for k in changed)
    if not allow:
        raise ValueError(f"--resume {path}: flags differ from the checkpoint's: {listed}. They "
                         f"change the algorithm or the data order; pass --allow-flag-changes to "
                         f"resume with them anyway")
    print(f"resuming {path} with changed flags (--allow-flag-changes): {listed}", flush=True)


def truncate_logs(out: str, step: int):
    """Drop log rows past `step` (a resumed run writes them again)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(path, "w") as f:
                f.writelines(rows)


def save(run, step: int) -> str:
    """out/step-N/: see the module docstring. A full disk is said as such; the previous
    checkpoints stay intact (this one is still step-N.tmp)."""
    final = os.path.join(run.args.out, f"step-{step:06d}")
    try:
        _write(run, final + ".tmp", step)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {final}.tmp: the earlier "
                                        f"checkpoints are intact; free space and --resume auto")
        raise
    dist = run.dist
    dist.barrier()
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(final + ".tmp", final)
        for old in checkpoints(run.args.out)[:-run.args.keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final  # the run says it on its own line (loop.Run.end_step): a bar may be drawn


def _write(run, tmp: str, step: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)
    dist = run.dist
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {}
    for name, part in run.trainables.items():
        full = get_model_state_dict(part.module, options=full_options)
        if dist.main:
            where = tmp if name == "policy" else os.path.join(tmp, name)
            M.save_model(part.module, run.tokenizer, where,
                         state_dict={k: v.to(dist.dtype) for k, v in full.items()})
        state[f"{name}.model"], state[f"{name}.optim"] = get_state_dict(part.module, part.opt)
    dist.barrier()
    if dist.grouped:  # each rank writes its shards
        dcp.save(state, checkpoint_id=os.path.join(tmp, "resume"))
    else:  # one process holds everything: a plain file (DCP is for process groups)
        torch.save(state, os.path.join(tmp, "resume.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-{dist.rank}.pt"))
    if dist.main:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(dict(step=step, world=dist.world,
                           schedulers={n: p.sched.state_dict() for n, p in run.trainables.items()},
                           tracked={n: obj.state_dict() for n, obj in run.tracked.items()},
                           args=vars(run.args)), f, indent=1)


def restore(path: str, run) -> int:
    """Load weights, optimizers, schedules (at the flags' learning rates), tracked state and RNG
    from a checkpoint; drop log rows past it. Returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    state = {}
    for name, part in run.trainables.items():
        state[f"{name}.model"], state[f"{name}.optim"] = get_state_dict(part.module, part.opt)
    if run.dist.grouped:
        dcp.load(state, checkpoint_id=os.path.join(path, "resume"))
    else:
        state = torch.load(os.path.join(path, "resume.pt"), weights_only=False)
    with open(os.path.join(path, "trainer_state.json")) as f:
        meta = json.load(f)
    for name, part in run.trainables.items():
        set_state_dict(part.module, part.opt, model_state_dict=state[f"{name}.model"],
                       optim_state_dict=state[f"{name}.optim"])
        part.sched.load_state_dict(meta["schedulers"][name])
        part.sched.base_lrs = [part.lr] * len(part.sched.base_lrs)  # a changed --lr applies now
        for group, base, factor in zip(part.opt.param_groups, part.sched.base_lrs,
                                       part.sched.lr_lambdas):
            group["lr"] = base * factor(part.sched.last_epoch)
    for name, obj in run.tracked.items():
        obj.load_state_dict(meta["tracked"][name])
    set_rng_state(torch.load(os.path.join(path, f"rng-{run.dist.rank}.pt"), weights_only=False))
    if run.dist.main:
        truncate_logs(run.args.out, meta["step"])
        print(f"resumed from {path} (step {meta['step']})", flush=True)
    run.dist.barrier()
    return meta["step"]


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
