"""`runtime serve` against the Python API on the same bundle: decode speed through HTTP, and the
time to first token of a conversation's tenth turn with and without the server's KV cache reuse.

    python benchmarks/bench_server.py BUNDLE [--tokens 64] [--rounds 5] [--conversations 3]
    # a random narrow E2B (every layer of the real model at small widths), float32, made first:
    python benchmarks/bench_server.py ~/bench-data/narrow-server --make e2b-narrow

decode: the same greedy request (a prompt of random words, fixed seed, checked beforehand to run
`--tokens` tokens without a stop token) through `stream_generate` in a child process and through
a `python -m runtime serve` child (completions, streamed, read with http.client so the client's
own parsing costs next to nothing), alternating, order rotating each round, after one warm-up of
each; each child loads the bundle once and idles while the other runs. Both rates are the same quantity: text pieces after the first over the time between the
first and the last piece, as each side sees them (the server's: as the client receives them).

turn 10: a conversation of `--turns` turns (user messages of `--words` random words, replies of
`--reply` greedy tokens sent back as the assistant's messages) through a server with cache reuse
and one started with `--no-cache-reuse`, alternating, each run on a freshly started server; time
to first token is from sending the request to the first piece of reply text.

Prints Markdown tables after a line of machine facts; `--json` also writes the raw samples.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import machine_facts, median, print_facts, table  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TURN_MARKERS = {105: "<start_of_turn>", 106: "<end_of_turn>"}  # Gemma's ids


# --- the bundle ----------------------------------------------------------------------------------

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with a word for every id of the model's vocabulary (Gemma's special
    tokens at their ids, <bos> added in front), so every generated token is one piece of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), vocab_size)]
    for i, marker in TURN_MARKERS.items():
        words[i] = marker
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS + list(TURN_MARKERS.values()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def plain_words(vocab_size: int) -> list[int]:
    """The ids of ordinary words (no special token)."""
    return [i for i in range(len(SPECIALS), vocab_size) if i not in TURN_MARKERS]


def make_bundle(out: Path, size: str) -> Path:
    """A random checkpoint of `size` with a word per token id, converted for this device in float32."""
    if (out / "manifest.yaml").exists():
        return out
    src = out.with_name(out.name + "-src")
    run = [sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--size", size, "--quiet", str(src)]
    subprocess.run(run, check=True)
    vocab = json.loads((src / "config.json").read_text())["text_config"]["vocab_size"]
    word_tokenizer(vocab).save(str(src / "tokenizer.json"))
    subprocess.run([sys.executable, "-m", "convert", "--target", "auto", "--dtype", "float32", "--quiet",
                    str(src), str(out)], check=True, cwd=ROOT)
    return out


# --- the server ----------------------------------------------------------------------------------

def start_ticker(ms: float) -> None:
    """A thread that wakes every `ms` milliseconds and does nothing else (see --ticker)."""
    def tick():
        while True:
            time.sleep(ms / 1000)

    if ms:
        threading.Thread(target=tick, daemon=True, name="ticker").start()


class Server:
    """`python -m runtime serve BUNDLE --port 0` in a child process (with `ticker`, the same
    command run through this script, which starts the ticker first)."""

    def __init__(self, bundle: Path, *args: str, ticker: float = 0.0):
        serve = ["serve", str(bundle), "--port", "0", *args]
        argv = ([sys.executable, __file__, str(bundle), "--ticker", str(ticker), "--serve-child", json.dumps(serve)]
                if ticker else [sys.executable, "-m", "runtime", *serve])
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.log: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                if re.search(r"serving .* on http://", line):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(600)
        found = [re.search(r":(\d+)/v1", line) for line in self.log]
        ports = [m.group(1) for m in found if m]
        if not ports:
            raise SystemExit("the server did not start:\n" + "\n".join(self.log))
        self.port = int(ports[0])
        self.model = str(bundle)

    def stream(self, path: str, body: dict) -> tuple[list[float], list[str], dict | None, float]:
        """Send a streamed request; (arrival time of each non-empty text piece, the pieces, the
        usage, the time it was sent)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        payload = json.dumps(dict(body, model=self.model, stream=True, stream_options={"include_usage": True}))
        sent = time.perf_counter()
        conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"{path}: {response.status} {response.read()[:500]!r}")
        times, pieces, usage = [], [], None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    times.append(time.perf_counter())
                    pieces.append(text)
        conn.close()
        return times, pieces, usage, sent

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


def rate(times: list[float]) -> float:
    """Pieces after the first over the time between the first and the last."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


# --- decode ----------------------------------------------------------------------------------------

def pick_prompt(model, tokenizer, length: int, tokens: int, seed: int) -> list[int]:
    """Random word ids whose greedy continuation runs `tokens` tokens without stopping."""
    from runtime.generate import stream_generate

    words = plain_words(model.config.vocab_size)
    for attempt in range(20):
        rng = random.Random(seed + attempt)
        ids = [2] + [rng.choice(words) for _ in range(length - 1)]  # <bos>, then words
        last = None
        for last in stream_generate(model, tokenizer, ids, max_tokens=tokens):
            pass
        if last is not None and last.finish_reason == "length":
            return ids
    raise SystemExit("no prompt found whose greedy continuation avoids the stop tokens")


def api_run(model, tokenizer, ids: list[int], tokens: int) -> tuple[float, int]:
    from runtime.generate import stream_generate

    times, n = [], 0
    for r in stream_generate(model, tokenizer, ids, max_tokens=tokens):
        n += 1
        if r.text:
            times.append(time.perf_counter())
    return rate(times), n


def api_worker(bundle: str) -> None:
    """The Python API side in a child process of its own, like the server's: one line of JSON
    `{"ids": [...], "tokens": n}` in, one line `[tok/s, tokens]` out, until end of input."""
    import runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = runtime.load(bundle)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(api_run(model, tokenizer, job["ids"], job["tokens"])), flush=True)


class ApiWorker:
    def __init__(self, bundle: Path, ticker: float = 0.0):
        self.proc = subprocess.Popen([sys.executable, __file__, str(bundle), "--api-worker", "--ticker", str(ticker)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def run(self, ids: list[int], tokens: int) -> tuple[float, int]:
        self.proc.stdin.write(json.dumps({"ids": ids, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


def server_run(server: Server, ids: list[int], tokens: int) -> tuple[float, int]:
    times, _, usage, _ = server.stream("/v1/completions", {"prompt": ids, "max_tokens": tokens, "temperature": 0})
    return rate(times), usage["completion_tokens"]


def bench_decode(bundle: Path, args) -> dict:
    import runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = runtime.load(bundle)
    ids = pick_prompt(model, tokenizer, args.prompt, args.tokens, args.seed)
    del model, tokenizer
    server, api = Server(bundle, ticker=args.ticker), ApiWorker(bundle, ticker=args.ticker)
    samples = {"api": [], "server": []}
    try:
        api.run(ids, args.tokens)  # warm-ups: compiled steps traced on both sides
        server_run(server, ids, args.tokens)
        for r in range(args.rounds):
            order = ["api", "server"] if r % 2 == 0 else ["server", "api"]
            for side in order:
                tps, n = api.run(ids, args.tokens) if side == "api" else server_run(server, ids, args.tokens)
                assert n == args.tokens, (side, n)
                samples[side].append(tps)
                print(f"  round {r + 1} {side}: {tps:.2f} tok/s", file=sys.stderr)
    finally:
        server.close()
        api.close()
    return samples


# --- turn 10 ---------------------------------------------------------------------------------------

def conversation(server: Server, args, seed: int) -> list[dict]:
    """Run one conversation; per turn: time to first token, prompt tokens, cached tokens."""
    rng = random.Random(seed)
    config = json.loads(Path(server.model, "config.json").read_text())
    vocab = plain_words((config.get("text_config") or config)["vocab_size"])
    messages, turns = [], []
    for _ in range(args.turns):
        text = " ".join(f"w{rng.choice(vocab)}" for _ in range(args.words))
        messages.append({"role": "user", "content": text})
        times, pieces, usage, sent = server.stream("/v1/chat/completions",
                                                   {"messages": messages, "max_tokens": args.reply,
                                                    "temperature": 0})
        turns.append({"ttft_s": times[0] - sent if times else float("nan"), "prompt_tokens": usage["prompt_tokens"],
                      "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return turns


def bench_turns(bundle: Path, args) -> dict:
    samples = {"reuse": [], "no reuse": []}
    for r in range(args.conversations):
        order = ["reuse", "no reuse"] if r % 2 == 0 else ["no reuse", "reuse"]
        for mode in order:
            server = Server(bundle, *([] if mode == "reuse" else ["--no-cache-reuse"]))
            try:
                turns = conversation(server, args, seed=args.seed + r)
            finally:
                server.close()
            samples[mode].append(turns)
            last = turns[-1]
            print(f"  conversation {r + 1} {mode}: turn {args.turns} first token {last['ttft_s'] * 1000:.0f} ms, "
                  f"{last['prompt_tokens']} prompt tokens ({last['cached_tokens']} cached)", file=sys.stderr)
    return samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--make", metavar="SIZE", help="first make BUNDLE: a random checkpoint of this size "
                   "(benchmarks/make_checkpoint.py --size), a word per token id, converted in float32")
    p.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="decode: tokens per run")
    p.add_argument("--rounds", type=int, default=5, help="decode: runs of each side")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--words", type=int, default=30, help="words per user message")
    p.add_argument("--reply", type=int, default=16, help="tokens per reply")
    p.add_argument("--conversations", type=int, default=3, help="conversations per mode (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the samples here")
    p.add_argument("--ticker", type=float, default=0.0, metavar="MS",
                   help="decode: in both children, a thread that wakes every MS milliseconds (0: none); on a "
                        "virtual machine whose idle CPU is slow to wake, the server's own HTTP thread has this "
                        "effect, so this compares the two under the same wake-ups")
    p.add_argument("--api-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-child", type=json.loads, help=argparse.SUPPRESS)  # runtime's arguments, as JSON
    args = p.parse_args(argv)
    if args.api_worker or args.serve_child is not None:
        start_ticker(args.ticker)
        if args.api_worker:
            api_worker(str(args.bundle))
            return 0
        from runtime.cli import main as runtime_main

        return runtime_main(args.serve_child)
    bundle = make_bundle(args.bundle, args.make) if args.make else args.bundle
    facts = machine_facts()
    decode = bench_decode(bundle, args)
    turns = bench_turns(bundle, args) if args.conversations else {}
    facts["loadavg_end"] = machine_facts()["loadavg"]
    print_facts(facts)
    ticker = f", a {args.ticker:g} ms ticker in both" if args.ticker else ""
    print(f"\nbundle: {bundle}; decode: {args.prompt} prompt tokens, {args.tokens} generated, greedy, "
          f"{args.rounds} runs per side (median; min-max){ticker}\n")
    api, served = median(decode["api"]), median(decode["server"])
    print(table(["path", "decode tok/s", "min-max", "x Python API"], [
        ["Python API (stream_generate)", api, f"{min(decode['api']):.3g}-{max(decode['api']):.3g}", 1.0],
        ["server (SSE, /v1/completions)", served, f"{min(decode['server']):.3g}-{max(decode['server']):.3g}",
         served / api],
    ]))
    if turns:
        print(f"\nconversation: {args.turns} turns of {args.words}-word messages and {args.reply}-token replies; "
              f"{args.conversations} conversations per mode (median)\n")
        rows = []
        for mode, runs in turns.items():
            last = [run[-1] for run in runs]
            rows.append([mode, median([run[0]["ttft_s"] * 1000 for run in runs]),
                         median([t["ttft_s"] * 1000 for t in last]), median([t["prompt_tokens"] for t in last]),
                         median([t["cached_tokens"] for t in last])])
        print(table(["server", "turn 1 first token (ms)", f"turn {args.turns} first token (ms)",
                     f"turn {args.turns} prompt tokens", "of them cached"], rows))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "args": {k: str(v) for k, v in vars(args).items()},
                                         "decode": decode, "turns": turns}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
