"""fasttf's main job: train the lecture notes' Transformer to translate English to Spanish.

    python -m fasttf.demo [--device cpu|cuda] [--backend fasttf|torch] [--steps N] [--out DIR] ...
    torchrun --nproc_per_node 2 -m fasttf.demo --ddp        (DistributedDataParallel; gloo on the CPU)

Trains `fasttf.models.Transformer` on the corpus shipped in fasttf/data/en_es.tsv (the notes'
"let's go" -> "vamos" and "to go" -> "ir", plus a few hundred template sentences), on the GPU if
there is one, else on the CPU (where fasttf's C++ kernels run: attention, positional encoding,
add+LayerNorm; FASTTF_CPU_ATTENTION=triton runs the Triton attention kernel under the interpreter
instead). Then it prints the translations of "let's go" and of held-out sentences, compares
the same weights on backend="torch" (largest logit difference, time of a training step), writes
PNG figures (positional encoding, attention weights of every head for "let's go") and a
checkpoint to --out, and exits non-zero if "let's go" does not translate to "vamos".
"""

import argparse
import copy
import math
import os
import sys
import time

import torch

COMMAND = [sys.executable, "-m", "fasttf.demo"]
DEFAULTS = {"cpu": dict(d_model=64, heads=4, layers=2, ffn=128, steps=200, batch_size=64, dropout=0.1, threads=1),
            "cuda": dict(d_model=64, heads=2, layers=2, ffn=128, steps=400, batch_size=64, dropout=0.0, threads=0)}
NOTES_PAIRS = [("let's go", "vamos"), ("to go", "ir")]  # in every training batch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fasttf.demo",
        description="Train the lecture notes' encoder-decoder Transformer on a small English->Spanish "
                    "corpus, translate \"let's go\" and held-out sentences, compare backend fasttf with "
                    "backend torch, and write figures. Exits 1 if \"let's go\" is not translated to \"vamos\".")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: the GPU if there is one); on the CPU fasttf's C++ "
                             "kernels run (FASTTF_CPU_ATTENTION=triton: the Triton attention kernel under the "
                             "Triton interpreter, TRITON_INTERPRET=1 set by the demo itself when missing)")
    parser.add_argument("--backend", choices=["fasttf", "torch"], default="fasttf",
                        help="fasttf: fasttf's attention (Triton on the GPU, C++ on the CPU) + C++/CUDA "
                             "positional encoding and add+LayerNorm; "
                             "torch: plain PyTorch (nn.MultiheadAttention, eager ops) (default: fasttf)")
    size = parser.add_argument_group(
        "model size and training (defaults: first value on the CPU, second on the GPU; the CPU ones keep "
        "the whole demo within about 2 minutes on 2 cores)")
    size.add_argument("--d-model", type=int, help="values per word (the notes' toy: 2) [64 | 64]")
    size.add_argument("--heads", type=int, help="attention heads (the notes' toy: 1) [4 | 2]")
    size.add_argument("--layers", type=int, help="encoder layers and decoder layers, each [2 | 2]")
    size.add_argument("--ffn", type=int, help="hidden width of the feed-forward [128 | 128]")
    size.add_argument("--dropout", type=float, help="dropout probability [0.1 | 0]")
    size.add_argument("--pre-ln", action="store_true", help="pre-LN (x + f(LN(x))) instead of the paper's post-LN")
    size.add_argument("--steps", type=int, help="optimizer steps [200 | 400]")
    size.add_argument("--batch-size", type=int, help="sentence pairs per step and process [64 | 64]")
    size.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of Adam, warm-up then cosine decay (default: 0.01)")
    size.add_argument("--threads", type=int,
                      help="torch CPU threads [1 | torch's default]: this model's ops are too small to split, "
                           "and on a busy machine threads mostly wait for each other")
    size.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batches (default: 0)")
    parser.add_argument("--out", default="demo_out", help="folder for the figures and the checkpoint (default: demo_out)")
    parser.add_argument("--ddp", action="store_true",
                        help="DistributedDataParallel under torchrun (gloo on the CPU, nccl on the GPU, gloo "
                             "where processes share a GPU): "
                             "torchrun --nproc_per_node 2 -m fasttf.demo --ddp")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("d_model", "heads", "layers", "ffn", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be at least 0 (0: torch's default)")
    if args.steps < 0:
        parser.error("--steps must be at least 0")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    if not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must be in [0, 1)")
    return args


def triton_on_cpu(args) -> bool:
    """On the CPU the C++ attention kernel runs unless FASTTF_CPU_ATTENTION=triton asks for the Triton one."""
    return args.device == "cpu" and os.environ.get("FASTTF_CPU_ATTENTION", "").strip().lower() == "triton"


def needs_interpreter(args) -> bool:
    """The Triton kernel on the CPU needs TRITON_INTERPRET=1 set before triton is imported."""
    return triton_on_cpu(args) and os.environ.get("TRITON_INTERPRET", "0") != "1"


# ----------------------------------------------------------------------------------------------


def log(rank, *parts, **kwargs):
    if rank == 0:
        print(*parts, **kwargs, flush=True)


class Progress:
    """A plain-text progress bar: redrawn in place on a terminal, a line every 10% otherwise."""

    def __init__(self, total, enabled=True, width=30):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.start, self.last_tenth = time.perf_counter(), -1
        self.tty = sys.stdout.isatty()

    def update(self, step, loss):
        if not self.enabled:
            return
        done = step / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (1 - done) if done > 0 else float("nan")
        bar = "#" * int(done * self.width) + "." * (self.width - int(done * self.width))
        line = f"[{bar}] step {step:4d}/{self.total} loss {loss:6.3f} {elapsed:6.1f} s (eta {eta:5.1f} s)"
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", flush=True)
        elif int(done * 10) > self.last_tenth:
            self.last_tenth = int(done * 10)
            print(line, flush=True)


def learning_rate(step, steps, peak):
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, pairs, vocabs, args, device, rank=0, world_size=1, progress=True):
    """Adam with warm-up and cosine decay; each process draws its own batches (seed + rank).
    Returns the losses. `model` may be wrapped in DistributedDataParallel."""
    from fasttf.models.tokenizer import batches

    source_vocab, target_vocab = vocabs
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    data = batches(pairs, source_vocab, target_vocab, args.batch_size, seed=args.seed * 1000 + rank,
                   always=[pair for pair in NOTES_PAIRS if pair in pairs])
    bar = Progress(args.steps, enabled=progress and rank == 0)
    model.train()
    losses = []
    for step in range(args.steps):
        src, tgt_in, tgt_out = (t.to(device) for t in next(data))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        _, loss = model(src, tgt_in, tgt_out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.update(step + 1, losses[-1])
    return losses


def translate(model, sentences, source_vocab, target_vocab, device):
    """Greedy decoding (KV cache) of a padded batch of sentences -> the Spanish strings."""
    from fasttf.models.tokenizer import pad_batch

    model.eval()
    src = pad_batch([source_vocab.encode(s) for s in sentences], source_vocab.pad_id).to(device)
    decoded = model.greedy_decode(src, max_new_tokens=min(model.max_len - 1, 2 * src.size(1) + 4))
    return [target_vocab.decode(row) for row in decoded.tokens.cpu()]


TIMED_STEPS = 5  # per backend in the comparison, after a warm-up step


def time_train_steps(models, batch, repeats=TIMED_STEPS):
    """Median seconds of one Adam step (forward, backward, update) of each model, on copies of them,
    by backend name. The models' steps alternate, so a machine that drifts slows them alike (with two
    steps each, the slower one used to be the figure: a single stall read 4x on a shared CPU)."""
    steps = {}
    for model in models:
        trained = copy.deepcopy(model).train()
        steps[model.backend] = (trained, torch.optim.Adam(trained.parameters(), lr=1e-4))
    times = {backend: [] for backend in steps}
    for attempt in range(repeats + 1):  # the first round warms up (kernel compilation, caches)
        for backend, (trained, optimizer) in steps.items():
            if batch[0].is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            _, loss = trained(*batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if batch[0].is_cuda:
                torch.cuda.synchronize()
            if attempt:
                times[backend].append(time.perf_counter() - start)
    return {backend: sorted(t)[len(t) // 2] for backend, t in times.items()}


def compare_backends(model, batch):
    """The same weights on the other backend: the largest logit difference and the step times."""
    other = model.with_backend("torch" if model.backend == "fasttf" else "fasttf")
    model.eval()
    other.eval()
    with torch.no_grad():
        logits, loss = model(*batch)
        other_logits, other_loss = other(*batch)
    real = batch[2] != model.pad_id  # compare where there is a real target word
    difference = (logits - other_logits)[real].abs().max().item()
    times = time_train_steps([model, other], batch)
    return difference, (loss.item(), other_loss.item()), times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ddp and "RANK" not in os.environ:
        print("fasttf.demo: --ddp runs under torchrun: torchrun --nproc_per_node 2 -m fasttf.demo --ddp",
              file=sys.stderr)
        return 2
    if needs_interpreter(args) and "triton" in sys.modules:
        if argv is not None:  # called as a function: never replace the caller's process
            print("fasttf.demo: FASTTF_CPU_ATTENTION=triton with --device cpu needs TRITON_INTERPRET=1 set "
                  "before triton is imported",
                  file=sys.stderr)
            return 2
        # Triton was imported without the interpreter: start again with it (same pid under torchrun).
        print("fasttf.demo: no GPU: restarting with TRITON_INTERPRET=1 so the Triton kernels run on the CPU",
              flush=True)
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, COMMAND + sys.argv[1:])
    if needs_interpreter(args):
        os.environ["TRITON_INTERPRET"] = "1"

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import fasttf
    from fasttf.models import Transformer
    from fasttf.models.tokenizer import Vocab, encode_pairs, read_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world_size, local_rank = 0, 1, 0
    if args.ddp:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # nccl wants a GPU of its own per process; more processes than GPUs share them over gloo
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        one_gpu_each = args.device == "cuda" and processes_here <= torch.cuda.device_count()
        start_process_group("nccl" if one_gpu_each else "gloo")
    trained, finished = None, False
    try:
        if args.ddp:
            rank, world_size = dist.get_rank(), dist.get_world_size()
        gpu = local_rank % max(torch.cuda.device_count(), 1)
        device = torch.device(f"cuda:{gpu}" if args.device == "cuda" else "cpu")
        if args.device == "cuda":
            torch.cuda.set_device(device)

        train_pairs, test_pairs = read_pairs(split="train"), read_pairs(split="test")
        source_vocab = Vocab.build(english for english, _ in train_pairs)
        target_vocab = Vocab.build(spanish for _, spanish in train_pairs)
        kernels = "Triton interpreter" if triton_on_cpu(args) else "C++ kernels"
        where = f"{device}" + (f" ({kernels})" if args.device == "cpu" and args.backend == "fasttf" else "")
        log(rank, f"fasttf {fasttf.__version__} demo: backend={args.backend} on {where}, torch {torch.__version__}"
                  + (f", DDP over {world_size} processes" if args.ddp else ""))
        log(rank, f"corpus: {len(train_pairs)} training pairs, {len(test_pairs)} held out; vocabularies "
                  f"{len(source_vocab)} English and {len(target_vocab)} Spanish words")

        torch.manual_seed(args.seed)  # the same initial weights in every process
        model = Transformer(len(source_vocab), len(target_vocab), d_model=args.d_model, num_heads=args.heads,
                            num_encoder_layers=args.layers, num_decoder_layers=args.layers, dim_feedforward=args.ffn,
                            dropout=args.dropout, norm_first=args.pre_ln, max_len=32, backend=args.backend,
                            pad_id=source_vocab.pad_id, eos_id=source_vocab.eos_id).to(device)
        log(rank, f"model: d_model={args.d_model}, heads={args.heads}, layers={args.layers}+{args.layers}, "
                  f"ffn={args.ffn}, dropout {args.dropout:g}, {'pre' if args.pre_ln else 'post'}-LN, "
                  f"{sum(p.numel() for p in model.parameters())} parameters; {args.steps} steps of "
                  f"{args.batch_size} pairs")
        trained = DistributedDataParallel(model, device_ids=[gpu] if args.device == "cuda" else None) \
            if args.ddp else model

        start = time.perf_counter()
        losses = train(trained, train_pairs, (source_vocab, target_vocab), args, device, rank, world_size)
        train_seconds = time.perf_counter() - start
        if losses:
            log(rank, f"trained in {train_seconds:.1f} s ({train_seconds / len(losses) * 1e3:.0f} ms a step), "
                      f"final loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")

        if args.ddp:
            identical = parameters_identical(model, dist)
            log(rank, f"ddp: parameters identical on all {world_size} processes: {identical}")
        finished = True
    finally:
        if args.ddp:
            trained = None  # DDP's reducer holds the process group: let it go before the group does
            end_process_group(synchronize=finished)
    if args.ddp:
        if rank != 0:
            # Only rank 0 goes on (translations, figures, the checkpoint). The others leave here and skip
            # the interpreter's teardown: the group's threads are joined already (end_process_group), this
            # older guard against "terminate called without an active exception" there (seen once in CI;
            # torchrun then stops rank 0 before it saves its checkpoint) is kept.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if identical else 1)
        if not identical:
            return 1

    # Translations
    os.makedirs(args.out, exist_ok=True)
    notes = [english for english, _ in NOTES_PAIRS]
    shown = test_pairs[:8]
    outputs = translate(model, notes + [english for english, _ in shown], source_vocab, target_vocab, device)
    print("\ntranslations (the notes' sentences, then held-out ones):")
    for english, spanish in zip(notes, outputs):
        print(f"  {english:38s} -> {spanish}")
    held_out = outputs[len(notes):]
    for (english, expected), spanish in zip(shown, held_out):
        print(f"  {english:38s} -> {spanish:32s} {'ok' if spanish == expected else 'expected: ' + expected}")
    correct = sum(spanish == expected for (_, expected), spanish in zip(shown, held_out))
    src, tgt_in, tgt_out = (t.to(device) for t in encode_pairs(test_pairs, source_vocab, target_vocab))
    with torch.no_grad():
        predicted = model(src, tgt_in)[0].argmax(-1)
    real = tgt_out != target_vocab.pad_id
    word_accuracy = (predicted == tgt_out)[real].float().mean().item()
    print(f"held-out sentences translated exactly: {correct}/{len(shown)}; next word right given the correct "
          f"words before it, over all {len(test_pairs)} held-out sentences: {word_accuracy:.0%}")

    # The same weights on the other backend
    batch = tuple(t.to(device) for t in encode_pairs(test_pairs[:args.batch_size], source_vocab, target_vocab))
    other = "torch" if args.backend == "fasttf" else "fasttf"
    print(f"\nsame weights, backend {args.backend} vs {other} on {len(batch[0])} held-out pairs "
          f"(training step with dropout {args.dropout:g}):")
    try:
        difference, (loss, other_loss), times = compare_backends(model, batch)
    except NotImplementedError as error:  # an op of this build is missing
        print(f"  not compared: {error}")
    else:
        print(f"  largest logit difference: {difference:.3g}   (loss {loss:.6f} vs {other_loss:.6f})")
        slow = ("   (fasttf's attention runs under the Triton interpreter: slow by design)"
                if triton_on_cpu(args) else "")
        print(f"  training step (median of {TIMED_STEPS}, alternating): {args.backend} "
              f"{times[args.backend] * 1e3:.1f} ms, {other} {times[other] * 1e3:.1f} ms{slow}")

    # Figures and checkpoint
    if not args.no_figures:
        written = [positional_encoding_figure(args.d_model, os.path.join(args.out, "positional_encoding.png")),
                   attention_figure(model, source_vocab, target_vocab, "let's go", outputs[0], device,
                                    os.path.join(args.out, "attention_lets_go.png"))]
        print("\nfigures: " + ", ".join(written))
    torch.save({"config": model.config, "state_dict": model.state_dict()}, os.path.join(args.out, "model.pt"))
    source_vocab.save(os.path.join(args.out, "source_vocab.json"))
    target_vocab.save(os.path.join(args.out, "target_vocab.json"))
    print(f"checkpoint: {os.path.join(args.out, 'model.pt')} (+ source_vocab.json, target_vocab.json)")

    if outputs[0] != "vamos":
        print(f"\nFAILED: \"let's go\" was translated to {outputs[0]!r}, not 'vamos'", file=sys.stderr)
        return 1
    print("\n\"let's go\" -> \"vamos\": ok")
    return 0


def parameters_identical(model, dist) -> bool:
    """True when every process holds bit-identical parameters (checked with an all-gather)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    if dist.get_backend() == "gloo":  # gloo gathers CPU tensors (on CUDA it only reduces and broadcasts)
        flat = flat.cpu()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def start_process_group(*args, **kwargs):
    """`dist.init_process_group`, with torch.distributed.nn.functional imported first. Its functions
    take `group=group.WORLD` as a default argument, evaluated at import; DistributedDataParallel's
    constructor imports it, so once a group exists those defaults hold the default group for good:
    destroy_process_group then cannot free it, and its gloo threads (and rank 0's TCPStore server)
    live on into the interpreter's teardown, the likely source of the rare "terminate called without
    an active exception" aborts at exit. Imported before the group exists, the defaults are None
    (the default group, looked up at call time)."""
    import importlib

    import torch.distributed as dist

    importlib.import_module("torch.distributed.nn.functional")  # before the group exists: see above
    dist.init_process_group(*args, **kwargs)


def end_process_group(synchronize=True):
    """Deterministic teardown of the default process group, in every process: a barrier (no process
    still in a collective), then destroy_process_group, which frees the group here and joins its
    threads, not at the interpreter's exit. Drop the DistributedDataParallel wrapper first (its
    reducer holds the group). `synchronize=False` after an error: no barrier that the other
    processes may never reach."""
    import gc

    import torch.distributed as dist

    gc.collect()  # a DistributedDataParallel left in a reference cycle would keep the group alive
    try:
        if synchronize:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg: no display needed)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def positional_encoding_figure(d_model, path, length=32):
    """The notes' squiggles: PE[p, d] as curves of the position p for the first dims (sine for
    even d, cosine for odd d, slower and slower), and the whole encoding matrix PE[p, d]."""
    from fasttf.reference import sinusoid_table

    plt = _pyplot()
    figure, (curves, matrix) = plt.subplots(1, 2, figsize=(13, 4.5))
    smooth, words = torch.linspace(0, 12, 600), torch.arange(13)
    table, at_words = sinusoid_table(smooth, d_model).numpy(), sinusoid_table(words, d_model).numpy()
    smooth, words = smooth.numpy(), words.numpy()
    for dim in range(min(d_model, 6)):
        kind = "sin" if dim % 2 == 0 else "cos"
        line, = curves.plot(smooth, table[:, dim], label=f"value {dim} ({kind}, period "
                            f"{2 * math.pi * 10000 ** (2 * (dim // 2) / d_model):.3g})")
        curves.plot(words, at_words[:, dim], "o", color=line.get_color(), markersize=4)
    curves.set(title=f"positional encoding squiggles (d_model={d_model}); dots: the words' positions",
               xlabel="word position p", ylabel="PE[p, value]")
    curves.legend(fontsize=7, loc="lower left")
    image = matrix.imshow(sinusoid_table(torch.arange(length), d_model).numpy().T, aspect="auto", cmap="RdBu_r",
                          vmin=-1, vmax=1, origin="lower")
    matrix.set(title="the encoding matrix PE[p, d]", xlabel="word position p", ylabel="embedding value d")
    figure.colorbar(image, ax=matrix)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def attention_figure(model, source_vocab, target_vocab, english, spanish, device, path):
    """The attention probabilities of every head and layer for one sentence pair: encoder
    self-attention, decoder (causal) self-attention, encoder-decoder attention."""
    plt = _pyplot()
    src = torch.tensor([source_vocab.encode(english)], device=device)
    tgt_in = torch.tensor([[target_vocab.eos_id] + target_vocab.encode(spanish, add_eos=False)], device=device)
    model.eval()
    maps = model.attention_maps(src, tgt_in)
    source_words = english.split() + ["<EOS>"]
    target_words = ["<EOS>"] + spanish.split()
    labels = {"encoder self-attention": (source_words, source_words),
              "decoder self-attention": (target_words, target_words),
              "encoder-decoder attention": (target_words, source_words)}
    rows = [(kind, layer) for kind in maps for layer in range(len(maps[kind]))]
    heads = model.num_heads
    figure, axes = plt.subplots(len(rows), heads, figsize=(max(2.6 * heads + 1, 4.5), 2.4 * len(rows) + 0.4), squeeze=False)
    for row, (kind, layer) in enumerate(rows):
        queries, keys = labels[kind]
        for head in range(heads):
            axis = axes[row][head]
            probs = maps[kind][layer][0, head].float().cpu().numpy()
            axis.imshow(probs, cmap="viridis", vmin=0, vmax=1)
            for i in range(probs.shape[0]):
                for j in range(probs.shape[1]):
                    axis.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if probs[i, j] < 0.5 else "black")
            axis.set_xticks(range(len(keys)), keys, fontsize=7, rotation=30)
            axis.set_yticks(range(len(queries)), queries, fontsize=7)
            axis.set_title(f"{kind}\nlayer {layer + 1}, head {head + 1}", fontsize=8)
    figure.suptitle(f"attention weights for {english!r} -> {spanish!r}\n(rows: queries, columns: keys)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
