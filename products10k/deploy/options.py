"""The command line of ``products10k-serve`` (products10k/deploy/serve.py): its options with their
checks, and the bearer-token file enrolment needs."""

from __future__ import annotations

import argparse
from pathlib import Path

from products10k.common import Products10kError
from products10k.deploy import connections
from products10k.imaging.archive import read_file
from products10k.imaging.images import ImageDefect


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The options; ``description``: the command's help (serve.py's docstring)."""
    p = argparse.ArgumentParser(
        prog="products10k-serve",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="export folder (model.onnx + preprocess.json)")
    p.add_argument("--index", type=Path, help="index folder (models/<member>/index): knn, fused, enrolment")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", type=Path, help="file holding the bearer token enrolment requires")
    p.add_argument(
        "--versions", type=Path, help="where enrolled index versions go (default <index>.versions)"
    )
    p.add_argument("--max-request-mb", type=float, default=32.0)
    p.add_argument(
        "--max-inflight-mb",
        type=float,
        default=128.0,
        help="request bodies held at once by all requests together (at least --max-request-mb); "
        "a request that finds no room within --queue-wait-s is answered 503 with Retry-After",
    )
    p.add_argument("--queue-wait-s", type=float, default=5.0, help="how long a request waits for room")
    p.add_argument(
        "--min-upload-kbps",
        type=float,
        default=32.0,
        help="the floor rate of a request body in KB/s after --upload-grace-s (slower: 408)",
    )
    p.add_argument("--upload-grace-s", type=float, default=10.0, help="a body's time before the floor rate")
    p.add_argument("--max-images", type=int, default=64, help="images per request, zip members included")
    p.add_argument(
        "--max-inflated-mb", type=float, default=128.0, help="bytes zip members of one request may declare"
    )
    p.add_argument(
        "--max-pixels", type=int, default=None, help="decoded pixels per image (default: the export's)"
    )
    p.add_argument(
        "--keep-versions", type=int, default=3, help="enrolled index versions kept (older ones removed)"
    )
    p.add_argument(
        "--compact-every",
        type=int,
        default=256,
        help="enrolments kept as small segments before a version is written whole again",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="a read-only replica: serve the versions another service (the writer) publishes under "
        "--versions, picking up each within --poll-s; no enrolment",
    )
    p.add_argument("--poll-s", type=float, default=1.0, help="how often a follower looks for a new version")
    p.add_argument("--batch-size", type=int, default=32, help="largest batch the model runs")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long an image waits for a batch")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    connections.add_arguments(p)
    args = p.parse_args(argv)
    connections.check_arguments(p, args)
    if args.max_images < 1 or args.batch_size < 1 or args.max_request_mb <= 0 or args.batch_wait_ms < 0:
        p.error("--max-images and --batch-size must be >= 1, --max-request-mb > 0, --batch-wait-ms >= 0")
    if (
        args.keep_versions < 1
        or args.compact_every < 1
        or args.poll_s <= 0
        or args.max_inflated_mb <= 0
        or (args.max_pixels is not None and args.max_pixels < 1)
    ):
        p.error(
            "--keep-versions, --compact-every and --max-pixels must be >= 1, "
            "--max-inflated-mb and --poll-s > 0"
        )
    if args.max_inflight_mb < args.max_request_mb or args.queue_wait_s < 0 or args.min_upload_kbps <= 0:
        p.error("--max-inflight-mb must be >= --max-request-mb, --queue-wait-s >= 0, --min-upload-kbps > 0")
    if args.upload_grace_s < 0:
        p.error("--upload-grace-s must be >= 0")
    if args.follow and args.index is None:
        p.error("--follow needs --index (and the writer's --versions): a follower serves its versions")
    return args


def read_token(path: Path) -> str:
    try:  # bounded, and a regular file only: --token-file /dev/zero or a FIFO must not hang start-up
        token = read_file(path, 4096).decode("utf-8").strip()
    except ImageDefect as exc:
        raise Products10kError(f"{path}: the token file is {exc.detail}") from None
    except UnicodeDecodeError as exc:
        raise Products10kError(
            f"{path}: the token file is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise Products10kError(f"{path}: the token must be at least 16 printable characters, no spaces")
    return token
