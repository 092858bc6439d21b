"""``af2-ext demo``: the whole path on the bundled dataset, on whatever device is present.

1. trains a small trunk on the bundled real-protein dataset (block-sparse axial and MSA attention, compressed
   cross-attention and the reversible trunk all on, so every af2_ext kernel runs);
2. folds a held-out (test split) chain with the trained checkpoint: distogram -> MDS -> Cα trace -> PDB, plots
   of the predicted and true distogram and contact map, RMSD / GDT-TS / TM-score / lDDT-Cα against the truth;
3. writes ``report.md`` and ``report.json`` with the training loss drop, the validation distogram accuracy next
   to the "always the most frequent bin" baseline, and the fold metrics, and prints where everything is.

Sized to finish in about 5 minutes on a 2-core CPU (``--steps`` to change).
"""
from __future__ import annotations

import argparse
import os
import time

from af2_ext.app import data, fold, train
from af2_ext.app.structure import write_ca_trace
from af2_ext.app.train import TrainConfig
from af2_ext.fileio import atomic_open, check_output_dir, write_json_atomic
from af2_ext.residue_constants import RESTYPES, UNKNOWN_TOKEN


def demo_config(output_dir: str, steps: int, device: str, seed: int) -> TrainConfig:
    return TrainConfig(data="demo", crop_len=64, batch_size=2, dim=64, depth=2, heads=4, dim_head=32,
                       max_seq_len=256, reversible=True, sparse_self_attn=True, cross_attn_compress_ratio=2,
                       sparse_block_size=16, block_size=64, steps=steps, lr=2e-3, warmup_steps=max(1, steps // 20),
                       output_dir=os.path.join(output_dir, "train"), log_every=max(1, steps // 50),
                       eval_every=max(1, steps // 4), save_every=max(1, steps // 4), device=device, seed=seed)


def held_out_chain(max_len: int):
    """The test-split chain to fold: the longest run of consecutive residues with coordinates (at most
    ``max_len``) among the test chains. Returns (name, sequence, Cα (n, 3))."""
    loader = data.load_sidechainnet(local_scn_path=data.demo_dataset_path(), split="test", batch_size=1,
                                    max_seq_len=None, shuffle=False)
    best = None
    for batch in loader:
        present = (batch.coord_mask[0] & batch.mask[0] & (batch.seq[0] < UNKNOWN_TOKEN)).tolist()
        run = 0
        for i, ok in enumerate(present + [False]):
            if ok:
                run += 1
                continue
            length = min(run, max_len)
            if run and (best is None or length > best[2] - best[1]):
                best = (batch, i - run, i - run + length)
            run = 0
    if best is None:
        raise ValueError(f"the bundled dataset's test split has no chain with coordinates ({data.demo_dataset_path()})")
    batch, lo, hi = best
    sequence = "".join(RESTYPES[t] for t in batch.seq[0, lo:hi].tolist())
    name = batch.ids[0] if (lo, hi) == (0, int(batch.mask[0].sum())) else f"{batch.ids[0]}_{lo + 1}-{hi}"
    return name, sequence, batch.ca[0, lo:hi]


def _report(summary: dict, fold_metrics: dict, paths: dict, config, device: str, seconds: float) -> dict:
    losses = summary["losses"]
    k = max(1, min(10, len(losses) // 10))  # average a few steps at each end: single steps are noisy
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    final = summary["evals"][-1] if summary["evals"] else {}
    return {
        "seconds": round(seconds, 1), "steps": summary["step"], "device": device,
        "train_loss_first": first, "train_loss_last": last, "train_loss_drop": 1 - last / first,
        "val_acc": final.get("val_acc"), "val_baseline_acc": final.get("val_baseline_acc"),
        "val_lddt_ca": final.get("val_lddt_ca"), "fold": fold_metrics, "files": paths,
        "model": config.model_config(),
    }


def _markdown(report: dict) -> str:
    fold = report["fold"]
    lines = [
        "# af2-ext demo report", "",
        f"- {report['steps']} training steps in {report['seconds']:.0f} s on {report['device']}, model "
        f"{report['model']}",
        f"- training loss {report['train_loss_first']:.3f} -> {report['train_loss_last']:.3f} "
        f"(down {100 * report['train_loss_drop']:.0f} %)",
    ]
    if report["val_acc"] is not None:
        lines.append(f"- validation distogram accuracy {report['val_acc']:.3f} vs {report['val_baseline_acc']:.3f} "
                     f"for always predicting the most frequent bin"
                     + (f"; lDDT-Cα of the folded validation chains {report['val_lddt_ca']:.3f}"
                        if report["val_lddt_ca"] is not None else ""))
    if fold:
        lines.append(f"- held-out chain {fold['name']}: RMSD {fold['rmsd']:.2f} Å, GDT-TS {fold['gdt_ts']:.3f}, "
                     f"TM-score {fold['tm_score']:.3f}, lDDT-Cα {fold['lddt_ca']:.3f}, distogram accuracy "
                     f"{fold['distogram_accuracy']:.3f}")
    lines += ["", "Files:"] + [f"- {k}: `{v}`" for k, v in report["files"].items()]
    return "\n".join(lines) + "\n"


def run(output_dir: str = "demo_out", *, steps: int = 800, device: str = "auto", seed: int = 0,
        progress: bool = True, overwrite: bool = False) -> dict:
    """Train, fold, report; returns the report dict (also written to OUTPUT_DIR/report.json). An
    ``output_dir`` holding an earlier demo run is replaced only with ``overwrite``."""
    started = time.perf_counter()
    config = demo_config(output_dir, steps, device, seed)
    train.resolve_device(device, train.Dist())  # a bad --device fails here, before anything is written
    check_output_dir(output_dir, "--output-dir")
    previous = train.holds_run(config.output_dir)
    if previous and not overwrite:
        raise ValueError(f"--output-dir {output_dir!r} already holds a demo run ({', '.join(previous)} in "
                         f"{config.output_dir!r}); replace it with --overwrite, or choose another --output-dir")
    name, sequence, ca = held_out_chain(config.crop_len)  # the window length the model is trained on
    print(f"af2-ext demo: training {config.steps} steps on the bundled dataset "
          f"(sparse + compressed cross-attention + reversible), then folding held-out chain {name} "
          f"({len(sequence)} residues)", flush=True)
    summary = train.train(config, progress=progress, overwrite=overwrite)
    reference = write_ca_trace(os.path.join(output_dir, "fold", f"{name}_true.pdb"), sequence, ca)
    outputs = fold.fold_from_checkpoint(summary["checkpoint"], [(name, sequence)], os.path.join(output_dir, "fold"),
                                        reference=reference, device=device, seed=seed, progress=False)
    compared = outputs[0].metrics["reference"]
    fold_metrics = {"name": name, "residues": len(sequence),
                    **{k: compared[k] for k in ("rmsd", "gdt_ts", "tm_score", "lddt_ca", "distogram_accuracy")}}
    paths = {"checkpoint": summary["checkpoint"], "metrics log": summary["metrics_path"],
             "loss curve": summary["plot_path"], "reference structure": reference,
             **{f"predicted {k}": v for k, v in outputs[0].files.items()}}
    report = _report(summary, fold_metrics, paths, config, str(train.resolve_device(device, train.Dist())),
                     time.perf_counter() - started)
    paths["report"] = os.path.join(output_dir, "report.md")
    with atomic_open(paths["report"], "w") as f:
        f.write(_markdown(report))
    write_json_atomic(os.path.join(output_dir, "report.json"), report)
    return report


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output-dir", default="demo_out", help="where everything goes (default demo_out)")
    parser.add_argument("--steps", type=int, default=800, help="training steps (default 800, about 5 min on 2 CPU cores)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in OUTPUT_DIR")


def run_demo(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    report = run(args.output_dir, steps=args.steps, device=args.device, seed=args.seed, overwrite=args.overwrite)
    print()
    print(_markdown(report))
    return 0


__all__ = ["demo_config", "held_out_chain", "run", "add_demo_arguments", "run_demo"]
