"""Fine-tune a 4-bit causal LM with LoRA / DoRA adapters: one hand-written training loop.

    python train.py config.yaml [section.key=value ...] [--resume]
    torchrun --nproc_per_node N train.py config.yaml ...        # data-parallel over N GPUs (or CPU processes)

main() is the whole run, top to bottom: check the inputs, set up the base, data and adapters
(prepare.py), then the loop: the learning rate of the step, one optimizer step over grad_accum
micro-batches (trainer.train_step), logging, evaluation (evaluation.py) and checkpoints (checkpoints.py).
Under torchrun every process runs all of it; distributed.py's helpers do nothing in one process.
"""

import os
import sys
import time
from collections.abc import Sequence

import torch

import benchmark as B
import checkpoints
import config as C
import data as D
import distributed
import evaluation
import lora
import model as M
import prepare
import trainer


def main(argv: Sequence[str] | None = None) -> None:
    """The whole run: check the config, load the base and the data, add adapters, train, save."""
    args = C.cli(
        __doc__.splitlines()[0],
        argv,
        lambda ap: ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint"),
    )
    # Under torchrun every process runs all of main(); rank 0 alone prints and writes files for all
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # errors and warnings (stderr) still come from every process
    try:
        cfg = C.load_config(args.config, args.overrides)
        tc, dc = cfg["train"], cfg["data"]
        out_dir = tc["output_dir"]
        previous = checkpoints.check_output_dir(out_dir, args.resume, tc["overwrite"])
        ckpt, state = None, None
        if args.resume:
            ckpt, state = checkpoints.read_checkpoint(out_dir, world)
            C.check_resume_config(os.path.join(ckpt, "config.yaml"), cfg)  # refuse a run that would differ
        records = prepare.train_records(cfg)
        questions = B.questions_for(tc["benchmark"], tc["benchmark_limit"], cfg["model"]["cache_dir"])
        C.quiet_libraries()
        if world > 1:
            distributed.start_data_parallel(cfg["model"]["device"])
        saved_config = os.path.join(out_dir, "config.yaml") if args.resume else None
        run = prepare.prepare(cfg, {"": records}, ["default"], saved_config)
        if world > 1:
            distributed.barrier()  # every process has checked its inputs: only now may rank 0 clear an old run
    except (C.ConfigError, D.DataError, M.ModelError, ValueError) as e:
        C.fail(e)
    model, tok, device, dtype, collate = run.model, run.tok, run.device, run.dtype, run.collate
    train_ex, eval_ex = run.examples[""]
    eval_recs = records[1]
    tc["batch_size"] = run.batch_size  # `auto` resolved: the saved config holds the number
    if rank == 0:
        checkpoints.clear_output_dir(out_dir, previous)  # only now: a bad input above leaves an earlier run untouched
        checkpoints.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))  # the resolved config, every default
    if world > 1:
        prepare.seed_everything(tc["seed"] + rank)  # the adapters started equal; now each rank its own dropout
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer.make_optimizer(params, tc["lr"], tc["weight_decay"], device)
    # fp16 needs loss scaling (its exponent range is narrow); bf16 and fp32 do not, so the scaler is off
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    logger = C.Logger(out_dir if rank == 0 else None)
    trainable, total = M.count_parameters(model)
    print(
        f"model {run.base_path} on {device} in {str(dtype).replace('torch.', '')}, "
        f"{cfg['model']['quantization']}; adapters: {trainable:,} trainable of {total:,} parameters; "
        f"{len(train_ex)} train / {len(eval_ex)} eval examples"
    )
    print(
        f"batch: {tc['batch_size'] * tc['grad_accum'] * world} sequences per optimizer step = "
        f"{tc['batch_size']} (train.batch_size) x {tc['grad_accum']} (train.grad_accum) x {world} "
        f"process{'es' if world > 1 else ''}"
    )

    def evaluate() -> dict[str, float]:
        return evaluation.eval_metrics(
            model, tok, eval_ex, eval_recs, tc["batch_size"], collate, device, dtype,
            tc["eval_max_new_tokens"], dc["system_prompt"],
        )  # fmt: skip

    def benchmark(step: int) -> None:  # train.benchmark: knowledge kept or lost (every rank scores, rank 0 logs)
        if questions and B.due(step, tc["max_steps"], tc["benchmark_every"]):
            result, _ = B.mmlu(model, tok, questions, device, dtype)
            logger.log(step=step, **B.record(tc["benchmark"], result))
            print(f"step {step}: {tc['benchmark']} accuracy {result['accuracy']:.4f} on {result['n']} questions "
                  f"({B.describe(result)})")  # fmt: skip

    step = 0
    if args.resume:
        lora.load_adapter(model, os.path.join(ckpt, "adapter"), "default")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict before torchrun
        checkpoints.set_rng_state(rngs[rank])
        step = state["step"]
        logger.log(event="resume", step=step)
        print(f"resumed from {ckpt}")
    elif eval_ex:
        metrics = evaluate()
        logger.log(step=0, **metrics)
        print(f"step 0: {evaluation.describe(metrics)} (before training)")
    if not args.resume:
        benchmark(0)

    # One shared order of micro-batches, dealt out to the ranks; a resumed run skips what it has trained on
    batches = trainer.batch_stream(
        train_ex, tc["batch_size"], tc["seed"], dc["group_by_length"], collate,
        start=step * tc["grad_accum"] * world, rank=rank, world=world,
    )  # fmt: skip
    from tqdm import tqdm

    bar = tqdm(total=tc["max_steps"], initial=step, dynamic_ncols=True, disable=True if rank else None)
    model.train()
    bad_steps, t0, tokens_seen = 0, time.time(), 0
    while step < tc["max_steps"]:
        lr = trainer.lr_at(step, tc["max_steps"], tc["warmup_steps"], tc["lr"], tc["min_lr_ratio"])
        trainer.set_lr(optimizer, lr)
        micro = [next(batches) for _ in range(tc["grad_accum"])]
        loss, n_tokens, grad_norm = trainer.train_step(
            model, params, optimizer, scaler, micro, device, dtype, tc["max_grad_norm"]
        )
        step += 1
        if loss is None:  # NaN/inf somewhere in the step: no update was made; stop if it keeps happening
            bad_steps += 1
            if rank == 0:
                tqdm.write(f"warning: step {step}: loss is NaN/inf, step skipped", file=sys.stderr)
            logger.log(step=step, event="nonfinite_loss")
            if bad_steps >= tc["max_bad_steps"]:
                last = checkpoints.latest_checkpoint(out_dir)
                C.fail(
                    f"the loss was NaN/inf for {bad_steps} steps in a row; lower train.lr or check the data"
                    + (f" (the last good checkpoint is {last})" if last else "")
                )
            continue
        bad_steps, tokens_seen = 0, tokens_seen + n_tokens
        bar.update(1)
        if step % tc["log_every"] == 0 or step == tc["max_steps"]:
            tok_s = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            logger.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tok_s)
            if bar.disable:
                print(f"step {step}: loss {loss:.4f} lr {lr:.2e} {tok_s:.0f} tok/s")
            tokens_seen, t0 = 0, time.time()
        if eval_ex and tc["eval_every"] and step % tc["eval_every"] == 0 and step < tc["max_steps"]:
            metrics = evaluate()
            logger.log(step=step, **metrics)
            tqdm.write(f"step {step}: {evaluation.describe(metrics)}")
        if step < tc["max_steps"]:
            benchmark(step)
        if (tc["save_every"] and step % tc["save_every"] == 0) or step == tc["max_steps"]:
            rngs = distributed.all_gather(checkpoints.rng_state())  # every rank's, to resume its own dropout
            if rank == 0:
                checkpoints.save_checkpoint(
                    out_dir, step, model, optimizer, scaler, cfg, run.base_path, tc["keep_checkpoints"], rngs
                )
    bar.close()

    if eval_ex:
        metrics = evaluate()
        logger.log(step=step, **metrics)
        print(f"step {step}: {evaluation.describe(metrics)} (end of training)")
    benchmark(step)
    if rank == 0:
        final = os.path.join(out_dir, "adapter")
        checkpoints.write_atomically(final, lambda tmp: lora.save_adapter(model, tmp, "default", run.base_path))
        print(f"adapter saved to {final}")
    distributed.stop_data_parallel()


if __name__ == "__main__":
    main()
