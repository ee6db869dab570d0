"""``vllm-kvstream``: the plugin's own command line (serving is stock ``vllm serve``).

    vllm-kvstream eval ppl      [--model DIR] [--text austen|FILE] [--policies ...] [--caches 4+252,...]
    vllm-kvstream eval passkey  [--model DIR] [--lengths ...] [--depths ...] [--policies ...] [--caches ...]
    vllm-kvstream compare       [--model DIR] [--policies stock,full,...] [--kv-memory-mib M] [--concurrency 1,2,4,8,16]
    vllm-kvstream soak          [--model DIR] [--policy NAME[:K=V]] [--requests 1000] [--fault-repeats 5]

Every policy name the registry knows is accepted; each runs at every cache size given
(``S+W`` tokens; a policy states how it spends that budget in ``params_for_cache``), and a
policy without a cache size (``full``) runs once. Each run is a fresh vLLM engine.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("vllm_kvstream")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    return parse


def _cache(text: str):
    from vllm_kvstream.eval.ppl import Cache

    try:
        return Cache.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cache_text(text: str) -> str:
    """``--cache`` of compare: checked like ``--caches``, kept as written (the report shows it)."""
    _cache(text)
    return text


def _count(low: int = 1):
    """argparse type: an integer >= ``low``; anything else is refused naming the value."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: integers >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is too small; allowed: integers >= {low}")
        return value

    return count


def _number(low: float, high: float = math.inf, *, low_open: bool = False):
    """argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    allowed = f"numbers {'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: {allowed}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: {allowed}")
        return value

    return number


def _list(kind):
    """argparse type: a non-empty comma-separated list of ``kind``."""
    items = _csv(kind)

    def parse(text: str):
        values = items(text)
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} holds no value; allowed: a comma-separated list of one or more")
        return values

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model folder, or a prepared model: smollm2 (default), gemma3, tiny, tiny-FAMILY")
    p.add_argument("--policies", type=_list(str), default=["full", "sliding-window", "streaming-sink"],
                   help="comma-separated policies, each NAME[:KEY=VALUE...] to override how it sizes itself, "
                        "e.g. topk-importance:score=key-norm; 'stock': vLLM without the plugin (default: full,sliding-window,streaming-sink)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk", type=_count(), default=2048, help="prefill chunk (max_num_batched_tokens)")
    p.add_argument("--block-size", type=_count(), default=None, help="KV block size (default: vLLM's; a window must hold one block)")
    p.add_argument("--out", type=Path, default=None, help="output folder")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, refusing ``--flag=--``: Python 3.11's argparse drops that ``--`` and leaves the
    option empty (``None`` or ``[]``) without a word, e.g. ``--tokens=--`` would mean every token."""

    def parse_known_args(self, args=None, namespace=None):
        for arg in sys.argv[1:] if args is None else args:
            flag, sep, value = str(arg).partition("=")
            if flag.startswith("--") and sep and value == "--":
                self.error(f"argument {flag}: '--' is not a value; allowed: the option's value after {flag}=")
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    ap = _ArgumentParser(prog="vllm-kvstream", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="quality evaluations through vLLM").add_subparsers(dest="eval", required=True)

    ppl = ev.add_parser("ppl", help="streaming perplexity of a long text")
    _common(ppl)
    ppl.add_argument("--text", default="austen", help="'austen' (Jane Austen's six novels) or a UTF-8 text file")
    ppl.add_argument("--caches", type=_list(_cache), default=[_cache("4+252"), _cache("4+508"), _cache("4+1020")])
    ppl.add_argument("--tokens", type=_count(2), default=65536, help="stream length in tokens")
    ppl.add_argument("--full-tokens", type=_count(2), default=None,
                     help="cap the stream for policies without a cache size (full attention is O(n^2)); default: --tokens")
    ppl.add_argument("--segment", type=_count(), default=1024, help="tokens per perplexity segment")
    ppl.add_argument("--tail", type=_count(), default=8192, help="report perplexity of the last TAIL tokens too")
    ppl.add_argument("--snapshot-every", type=_count(0), default=65536,
                     help="save a running stream's state every this many tokens, so an interrupted evaluation "
                          "continues from there (0: only finished runs are kept)")
    ppl.add_argument("--partial", action="store_true",
                     help="compute nothing: write the outputs from the finished runs and the snapshots of "
                          "unfinished ones in OUT (where an interrupted evaluation stands)")

    pk = ev.add_parser("passkey", help="passkey retrieval accuracy")
    _common(pk)
    pk.add_argument("--caches", type=_list(_cache), default=[_cache("4+1020")])
    pk.add_argument("--lengths", type=_list(_count()), default=[1024, 2048, 4096, 8192])
    pk.add_argument("--depths", type=_list(_number(0.0, 1.0)), default=[0.1, 0.3, 0.5, 0.7, 0.9])
    pk.add_argument("--trials", type=_count(), default=2)
    pk.add_argument("--seed", type=int, default=0)

    from vllm_kvstream.compare import DEFAULT_POLICIES, LOCUSTFILE

    cp = sub.add_parser("compare", help="policies under the same locust load at equal KV memory: a report with charts")
    cp.add_argument("--model", default=None, help="Hugging Face model folder, or a prepared model: smollm2 (default), gemma3, tiny, tiny-FAMILY")
    cp.add_argument("--policies", type=_list(str), default=list(DEFAULT_POLICIES),
                    help="comma-separated: 'stock' (vLLM without the plugin's flags) and policies "
                         f"NAME[:KEY=VALUE...] as eval takes them (default: {','.join(DEFAULT_POLICIES)})")
    cp.add_argument("--cache", type=_cache_text, default="4+252", help="cache budget SINK+WINDOW of the bounded policies")
    cp.add_argument("--kv-memory-mib", type=_count(), default=128, help="KV memory of every server (--kv-cache-memory-bytes)")
    cp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cp.add_argument("--block-size", type=_count(), default=64)
    cp.add_argument("--chunk", type=_count(), default=128, help="prefill chunk (max_num_batched_tokens): the window W")
    cp.add_argument("--max-num-seqs", type=_count(), default=64)
    cp.add_argument("--concurrency", type=_list(_count()), default=[1, 2, 4, 8, 16], help="concurrent long streams per level")
    cp.add_argument("--lengths", type=_list(_count()), default=[256, 512, 1024, 2048],
                    help="prompt lengths of the one-at-a-time sweep the analytical model is fitted to")
    cp.add_argument("--long-prompt-tokens", type=_count(), default=1024, help="prompt tokens of the concurrent streams")
    cp.add_argument("--output-tokens", type=_count(), default=128, help="output tokens per stream (pinned)")
    cp.add_argument("--stage-seconds", type=_number(0.0, low_open=True), default=600.0, help="time bound of each locust run")
    cp.add_argument("--text", default="austen", help="prompt text: 'austen' or a UTF-8 file")
    cp.add_argument("--locustfile", type=Path, default=LOCUSTFILE)
    cp.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    cp.add_argument("--out", type=Path, default=Path("kvstream-compare"))
    cp.add_argument("--report-only", action="store_true",
                    help="rebuild report.md and the charts from OUT/results.json without running anything")

    sk = sub.add_parser("soak", help="faults and a long random streaming load against one vllm serve; ends in a leak check")
    sk.add_argument("--model", default="tiny", help="Hugging Face model folder, or a prepared model: tiny (default), smollm2, gemma3, tiny-FAMILY")
    sk.add_argument("--policy", default="streaming-sink",
                    help="the server's policy, NAME[:KEY=VALUE...] as eval takes it (kv_quant=int4 for quantized blocks), or 'stock'")
    sk.add_argument("--cache", type=_cache_text, default="4+252", help="cache budget SINK+WINDOW of the policy")
    sk.add_argument("--max-stream-tokens", type=_count(), default=4096,
                    help="the policy's max_stream_tokens (the server's max_model_len); default 4096")
    sk.add_argument("--requests", type=_count(0), default=1000, help="requests of the random phase (0: none)")
    sk.add_argument("--concurrency", type=_count(), default=8)
    sk.add_argument("--min-prompt-tokens", type=_count(), default=1)
    sk.add_argument("--max-prompt-tokens", type=_count(), default=3000)
    sk.add_argument("--max-output-tokens", type=_count(), default=300)
    sk.add_argument("--abort-share", type=_number(0.0, 1.0), default=0.2, help="share of requests the client drops on purpose")
    sk.add_argument("--chat-share", type=_number(0.0, 1.0), default=0.2, help="share of requests sent through the chat API")
    sk.add_argument("--request-policies", type=_json_objects, default=[],
                    help="JSON list of vllm_xargs objects, one drawn per request, e.g. "
                         "'[{}, {\"kv_policy\": \"sliding-window\"}]' ({}: the server's policy)")
    sk.add_argument("--fault-repeats", type=_count(0), default=5, help="repeats of each scripted fault (0: none)")
    sk.add_argument("--stop-under-load", action=argparse.BooleanOptionalAction, default=True,
                    help="end by stopping the server with streams in flight (SIGINT)")
    sk.add_argument("--stop-timeout", type=_number(0.0, low_open=True), default=60.0, help="seconds the server has to exit")
    sk.add_argument("--max-seconds", type=_number(0.0, low_open=True), default=3600.0, help="time bound of the random phase")
    sk.add_argument("--warmup-share", type=_number(0.0, 0.99), default=0.2, help="RSS growth is measured after this share of requests")
    sk.add_argument("--rss-every", type=_count(), default=50, help="sample RSS every N finished requests")
    sk.add_argument("--rss-tolerance-mib", type=_number(0.0), default=64.0, help="allowed RSS growth per process after warm-up")
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--keep-onednn-cache", action="store_true",
                    help="keep oneDNN's primitive cache on in the server (it grows with the batch shapes seen and hides leaks)")
    sk.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sk.add_argument("--block-size", type=_count(), default=32, help="KV block size (stock CPU attention needs a multiple of 32)")
    sk.add_argument("--chunk", type=_count(), default=256, help="prefill chunk (max_num_batched_tokens)")
    sk.add_argument("--max-num-seqs", type=_count(), default=16)
    sk.add_argument("--kv-memory-mib", type=_count(), default=64, help="KV memory of the server (--kv-cache-memory-bytes)")
    sk.add_argument("--server-args", type=_csv(str), default=[], help="more vllm serve flags, comma-separated")
    sk.add_argument("--out", type=Path, default=Path("kvstream-soak"))
    return ap


def _json_objects(text: str) -> list[dict]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc.msg}); expected a list of objects") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON list of objects, e.g. '[{{}}]'")
    return value


class _Bar:
    """A tqdm bar per run, fed by the engine subprocess's progress lines."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True)
        self.started = False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:  # a resumed run starts where its snapshot was: rate and ETA count from there
            self.started = True
            self.bar.initial = done
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _model(path: str | None) -> Path:
    """A Hugging Face folder, or a model the plugin prepares locally by name (``smollm2``,
    ``gemma3``, ``tiny``, ``tiny-FAMILY``); default ``smollm2``."""
    from vllm_kvstream import models

    name = "smollm2" if path is None else path
    try:
        folder = bool(name) and Path(name).is_dir()  # "" is not a folder here (Path("") is the working directory)
    except (OSError, ValueError):  # a name too long for a path, a NUL in it
        folder = False
    if folder:
        return Path(name)
    prepared = {"smollm2": models.prepare_smollm2, "gemma3": models.prepare_gemma3, "tiny": models.build_tiny_llama}
    prepared.update({f"tiny-{f}": (lambda f=f: models.build_tiny_family(f)) for f in models.TINY_FAMILIES})
    if name not in prepared:
        raise SystemExit(
            f"vllm-kvstream: error: --model {name!r} is neither a model folder nor a prepared model; "
            f"allowed: a folder with config.json, or {', '.join(prepared)}"
        )
    return prepared[name]()


def _trained_context(model: Path) -> int | None:
    import json

    return json.loads((model / "config.json").read_text()).get("max_position_embeddings")


def cmd_ppl(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from vllm_kvstream.data import load_text
    from vllm_kvstream.eval.ppl import (
        load_checkpoint,
        plan_runs,
        load_snapshot_progress,
        save_checkpoint,
        snapshot_path,
        token_logprobs,
        write_blocks,
        write_outputs,
    )

    runs = plan_runs(args.policies, args.caches)  # before the model is prepared: bad options end at once
    model = _model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    from vllm_kvstream.eval.engine import leading_special_tokens

    tokens = (leading_special_tokens(tokenizer) + tokenizer.encode(load_text(args.text), add_special_tokens=False))[: args.tokens]
    if len(tokens) < args.tokens:
        log.warning("the text has only %d tokens; evaluating all of them", len(tokens))
    results = {}
    blocks: dict[str, dict] = {}
    out = args.out or Path("kvstream-eval") / "ppl"
    summary = {}
    settings = {"dtype": args.dtype, "chunk": args.chunk, "block_size": args.block_size}
    for run in runs:
        stream = tokens if run.cache is not None else tokens[: args.full_tokens or len(tokens)]
        # A run that finished before (an interrupted evaluation started again) is read back,
        # not recomputed: each run is kept in OUT/runs/ as soon as it ends.
        saved = load_checkpoint(out, model, stream, run, settings)
        if saved is None and args.partial:  # report where an unfinished run stands, compute nothing
            saved = load_snapshot_progress(snapshot_path(out, model, stream, run, settings))
            if saved is None:
                log.warning("%s: neither finished nor snapshotted in %s; left out", run.label, out / "runs")
                continue
            log.warning("%s: unfinished, reported up to token %d (its last snapshot)", run.label,
                        len(saved["logprobs"]))
        if saved is not None:
            log.info("%s: resumed from %s", run.label, out / "runs")
            results[run.label], blocks[run.label] = saved["logprobs"], saved["blocks"]
        else:
            bar = _Bar(run.label)
            blocks[run.label] = {}
            # An interrupted run continues from its last snapshot (every --snapshot-every tokens).
            snap = snapshot_path(out, model, stream, run, settings) if args.snapshot_every else None
            if snap is not None:
                snap.parent.mkdir(parents=True, exist_ok=True)
                if snap.exists():
                    log.warning("%s: continuing from the snapshot %s", run.label, snap)
            try:
                results[run.label] = token_logprobs(model, stream, run, dtype=args.dtype, chunk=args.chunk,
                                                    block_size=args.block_size, progress=bar, blocks=blocks[run.label],
                                                    snapshot=snap, snapshot_every=args.snapshot_every)
            finally:
                bar.close()
            save_checkpoint(out, model, stream, run, settings, results[run.label], blocks[run.label])
            if snap is not None:
                snap.unlink(missing_ok=True)  # the finished run's checkpoint replaces it
        write_blocks(out, blocks)
        log.info("%s: peak %d KV blocks held (every group), %d after the stream", run.label,
                 blocks[run.label]["peak"], blocks[run.label]["after"])
        # Written after every run, so a long evaluation that is stopped keeps what it measured.
        summary = write_outputs(out, results, segment=args.segment, tail_tokens=args.tail,
                                trained_context=_trained_context(model),
                                title=f"Streaming perplexity: {model.name} on {Path(args.text).name}, {len(tokens)} tokens")
    sys.stdout.write((out / "ppl_summary.md").read_text())
    return 0 if summary else 1


def cmd_passkey(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from vllm_kvstream.eval.passkey import answer_correct, build_trials, run_passkey, write_outputs
    from vllm_kvstream.eval.ppl import plan_runs

    runs = plan_runs(args.policies, args.caches)  # before the model is prepared: bad options end at once
    model = _model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    trials = build_trials(tokenizer, args.lengths, args.depths, args.trials, seed=args.seed)
    rows = []
    for run in runs:
        bar = _Bar(run.label)
        try:
            outputs = run_passkey(model, run, trials, dtype=args.dtype, chunk=args.chunk, block_size=args.block_size,
                                  progress=bar)
        finally:
            bar.close()
        for trial, ids in zip(trials, outputs):
            answer = tokenizer.decode(ids)
            rows.append({"run": run.label, "length": trial.length, "depth": trial.depth, "key": trial.key,
                         "answer": answer.strip(), "correct": int(answer_correct(answer, trial.key))})
    out = args.out or Path("kvstream-eval") / "passkey"
    write_outputs(out, rows, title=f"Passkey retrieval: {model.name}")
    sys.stdout.write((out / "passkey_summary.md").read_text())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vllm_kvstream.compare import compare, rebuild_report

    if args.report_only:
        if not (args.out / "results.json").is_file():
            raise ValueError(f"--report-only needs {str(args.out / 'results.json')!r} (from an earlier run with --out {args.out})")
        sys.stdout.write(rebuild_report(args.out).read_text())
        return 0
    for name in ("kv_memory_mib", "block_size", "chunk", "max_num_seqs", "long_prompt_tokens", "output_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("concurrency", "lengths"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad or not getattr(args, name):
            raise ValueError(f"--{name} {getattr(args, name)} must be a non-empty list of integers >= 1")
    if not args.locustfile.is_file():
        raise ValueError(f"--locustfile {str(args.locustfile)!r} is not a file")
    from vllm_kvstream.compare import plan_serve_runs
    from vllm_kvstream.eval.ppl import Cache

    plan_serve_runs(args.policies, Cache.parse(args.cache))  # before the model is prepared
    try:
        report = compare(args, _model(args.model))
    except RuntimeError as exc:  # a server that did not start: its log is named
        sys.stderr.write(f"vllm-kvstream compare: {exc}\n")
        return 1
    sys.stdout.write(report.read_text())
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from vllm_kvstream.soak import server_flags, soak, spec_from_args

    spec_from_args(args)  # every setting checked before a model is prepared or a server started
    server_flags(args)
    try:
        result, report = soak(args, _model(args.model))
    except RuntimeError as exc:  # a server that did not start: its log is named
        sys.stderr.write(f"vllm-kvstream soak: {exc}\n")
        return 1
    sys.stdout.write(report.read_text())
    return 0 if result["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from vllm_kvstream.errors import KVStreamConfigError

    try:
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "soak":
            return cmd_soak(args)
        if args.command == "eval" and args.eval == "ppl":
            return cmd_ppl(args)
        return cmd_passkey(args)
    except (KVStreamConfigError, ValueError) as exc:
        sys.stderr.write(f"vllm-kvstream: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
