from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a Triton model repository over the KServe v2 / Triton HTTP and gRPC protocols")
    p.add_argument("repo", help="model repository: REPO/<model>/config.pbtxt + REPO/<model>/<version>/model.onnx|model.plan")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port, printed in the log)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="gRPC port (KServe v2 GRPCInferenceService, as Triton's; 0 = any free port, printed in the log)")
    p.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    p.add_argument("--model-control-mode", choices=("none", "explicit"), default="none",
                   help="none: every model loads at start and load/unload answer 503 (Triton's default); "
                        "explicit: /v2/repository/models/<m>/load and /unload work, --load-model picks what loads at start")
    p.add_argument("--load-model", action="append", default=[], metavar="MODEL",
                   help="with --model-control-mode explicit: load MODEL at start (repeat it; '*' = every model)")
    p.add_argument("--max-body-mb", type=float, default=64,
                   help="request bodies (and gRPC messages) above this get 413 (RESOURCE_EXHAUSTED)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds a request may take when it sets no timeout")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for accepted requests")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per instance (default: usable cores / the model's instances / workers)")
    p.add_argument("--workers", default="1", metavar="N|auto",
                   help="server processes sharing the ports (SO_REUSEPORT), each with its own models and batchers "
                        "(model control mode none only; statistics and metrics are per worker). Default 1; 'auto' = one "
                        "per core this process may use (1 with --model-control-mode explicit)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto", help="what runs the models")
    p.add_argument("--no-strict-readiness", action="store_true", help="ready once loading ends even if a model failed")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up inferences before ready")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a complete request head (else 408 and closed)")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to send a request body after its head (else 408)")
    p.add_argument("--keepalive-timeout", type=float, default=75.0, help="idle keep-alive connections are closed after this")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections; more get 503 and are closed")
    p.add_argument("--max-inflate-ratio", type=float, default=32.0,
                   help="a gzip/deflate request body may inflate to at most this many times its size (else 413)")
    p.add_argument("--no-http-fast-path", action="store_true",
                   help="every HTTP request through aiohttp (the fast path answers whole plain infer requests itself; "
                        "this is for A/B runs and as an escape hatch)")
    p.add_argument("--grpc-transport", choices=("native", "grpcio"), default="native",
                   help="native: gRPC on resdeploy's own HTTP/2 connection (fast, the default); grpcio: grpc.aio "
                        "(for A/B runs and as an escape hatch)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="follow repository symlinks that leave a model's folder (refused by default; logged when followed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resdeploy.serve.server import ServerConfig, parse_workers, serve

    config = ServerConfig(host=args.host, port=args.port, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                          request_timeout_s=args.request_timeout, shutdown_timeout_s=args.shutdown_timeout,
                          threads=args.threads, backend=args.backend, strict_readiness=not args.no_strict_readiness,
                          warmup=not args.no_warmup, header_timeout_s=args.header_timeout,
                          body_timeout_s=args.body_timeout, keepalive_timeout_s=args.keepalive_timeout,
                          max_connections=args.max_connections, max_inflate_ratio=args.max_inflate_ratio,
                          follow_symlinks=args.follow_symlinks, grpc_port=None if args.no_grpc else args.grpc_port,
                          model_control_mode=args.model_control_mode, load_models=tuple(args.load_model),
                          workers=parse_workers(args.workers, args.model_control_mode),
                          http_fast_path=not args.no_http_fast_path, grpc_transport=args.grpc_transport)
    return serve(args.repo, config)
