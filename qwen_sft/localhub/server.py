"""A small Hugging Face Hub for tests: serves dataset repos from folders on 127.0.0.1 through the endpoints that
huggingface_hub and datasets call (repo info by revision, tree listing, paths-info, resolve with HEAD and Range).

Each repo has one or more commits, each a folder laid out like the real repo; `main` is the last one. The server
logs every file it sends (to prove what was read) and can misbehave on purpose: `fail_after` makes it drop every
file read after that many (a connection lost mid-stream), `hang` makes it accept connections and never answer,
`trickle` makes it answer one byte every TRICKLE_SECONDS (so no read ever times out), and `info_answer`, a
(status, body) pair, replaces every repo-info answer (a hub that fails, or answers garbage).

    with HubServer({"owner/name": [folder_v1, folder_v2]}) as hub:   # hub.endpoint -> HF_ENDPOINT
        ...

datasets derives a dataset-viewer host from HF_ENDPOINT ("http://datasets-server.127.0.0.1:PORT"); that name does
not resolve, so its calls fail at once, as they would for a mirror without the viewer.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

TRICKLE_SECONDS = 2.0  # a trickling answer's pace
TREE_PAGE_SIZE = 50  # entries per tree page (the hub pages at 1,000); small, so pagination is exercised


def _file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Commit:
    def __init__(self, folder: Path):
        self.folder = folder
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        self.files = {p.relative_to(folder).as_posix(): p for p in files}
        self.oids = {name: _file_sha1(path) for name, path in self.files.items()}
        digest = hashlib.sha1()
        for name, oid in self.oids.items():
            digest.update(f"{name}\0{oid}".encode())
        self.sha = digest.hexdigest()

    def entry(self, path: str) -> dict | None:
        if path in self.files:
            return {"type": "file", "oid": self.oids[path], "size": self.files[path].stat().st_size, "path": path}
        if any(name.startswith(path + "/") for name in self.files):
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        return None

    def children(self, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        names = set()
        for name in self.files:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            if recursive:
                names.update(prefix + "/".join(rest[: depth + 1]) for depth in range(len(rest)))
            else:
                names.add(prefix + rest[0])
        return [self.entry(name) for name in sorted(names)]


class HubServer:
    def __init__(self, repos: dict[str, list[Path]]):
        self.repos = {repo_id: [_Commit(Path(folder)) for folder in folders] for repo_id, folders in repos.items()}
        self.sent: list[str] = []  # "repo_id/path" of every file body sent (GET), in order
        self.bytes_sent = 0  # file bytes sent
        self.fail_after: int | None = None  # drop every file GET after this many have been sent
        self.hang = False
        self.trickle = False
        self.info_answer: tuple[int, bytes] | None = None
        self._release = threading.Event()  # set to let hanging requests go (they then close)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def reset(self) -> None:
        """Behave again, release hanging requests and forget what was sent."""
        self.hang, self.trickle, self.info_answer, self.fail_after = False, False, None, None
        self._release.set()
        self._release = threading.Event()
        self.sent.clear()
        self.bytes_sent = 0

    def commit(self, repo_id: str, revision: str) -> _Commit | None:
        commits = self.repos.get(repo_id)
        if not commits:
            return None
        if revision == "main":
            return commits[-1]
        return next((commit for commit in commits if commit.sha.startswith(revision) and len(revision) >= 7), None)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_for(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _json(self, value, status=200, headers=None):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, item in (headers or {}).items():
                self.send_header(key, item)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _not_found(self, what: str, error_code="EntryNotFound"):
            self._json({"error": f"{what} not found"}, 404, {"X-Error-Code": error_code})

        def _hang(self) -> bool:
            if hub.hang:
                hub._release.wait(600)
                self.close_connection = True
                return True
            if hub.trickle:
                answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                for byte in answer + b" " * 1000:
                    if hub._release.wait(TRICKLE_SECONDS):
                        break
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        break
                self.close_connection = True
                return True
            return False

        def do_HEAD(self):
            if not self._hang():
                self._route()

        def do_GET(self):
            if not self._hang():
                self._route()

        def do_POST(self):
            if self._hang():
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            url = urlparse(self.path)
            parts = unquote(url.path).strip("/").split("/")
            # /api/datasets/{owner}/{name}/paths-info/{revision}
            if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] == "paths-info":
                commit = hub.commit("/".join(parts[2:4]), "/".join(parts[5:]))
                if commit is None:
                    return self._not_found("revision", "RevisionNotFound")
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    paths = json.loads(body).get("paths", [])
                else:
                    paths = parse_qs(body).get("paths", [])
                return self._json([entry for path in paths if (entry := commit.entry(path.strip("/")))])
            self._not_found("route")

        def _route(self):
            url = urlparse(self.path)
            parts = unquote(url.path).strip("/").split("/")
            query = parse_qs(url.query)
            if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                if len(parts) == 4:
                    return self._info(repo_id, "main")
                if parts[4] == "revision":
                    return self._info(repo_id, "/".join(parts[5:]))
                if parts[4] == "tree" and len(parts) >= 6:
                    return self._tree(repo_id, parts[5], "/".join(parts[6:]), query)
            if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                return self._resolve("/".join(parts[1:3]), parts[4], "/".join(parts[5:]))
            self._not_found("route")

        def _info(self, repo_id, revision):
            if hub.info_answer:
                status, body = hub.info_answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return self.wfile.write(body)
            commits = hub.repos.get(repo_id)
            if not commits:
                return self._not_found("repository", "RepoNotFound")
            commit = hub.commit(repo_id, revision)
            if commit is None:
                return self._not_found("revision", "RevisionNotFound")
            self._json({
                "_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0], "sha": commit.sha, "private": False,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": name} for name in commit.files],
            })

        def _tree(self, repo_id, revision, folder, query):
            commit = hub.commit(repo_id, revision)
            if commit is None:
                return self._not_found("revision", "RevisionNotFound")
            if folder and (commit.entry(folder) or {}).get("type") != "directory":
                return self._not_found(f"folder {folder}")
            entries = commit.children(folder, query.get("recursive", ["false"])[0].lower() == "true")
            start = int(query.get("cursor", ["0"])[0])
            page = entries[start : start + TREE_PAGE_SIZE]
            headers = {}
            if start + TREE_PAGE_SIZE < len(entries):
                next_url = f"{hub.endpoint}{urlparse(self.path).path}?recursive={query.get('recursive', ['false'])[0]}"
                headers["Link"] = f'<{next_url}&cursor={start + TREE_PAGE_SIZE}>; rel="next"'
            self._json(page, headers=headers)

        def _resolve(self, repo_id, revision, path):
            commit = hub.commit(repo_id, revision)
            if commit is None:
                return self._not_found("revision", "RevisionNotFound")
            if path not in commit.files:
                return self._not_found(f"file {path}")
            size = commit.files[path].stat().st_size
            start, end = 0, size - 1
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes="):
                first, _, last = ranged[6:].partition("-")
                start, end = (int(first), int(last) if last else size - 1) if first else (
                    max(0, size - int(last)), size - 1)
                end = min(end, size - 1)
            if self.command == "GET":
                if hub.fail_after is not None and len(hub.sent) >= hub.fail_after:
                    self.close_connection = True  # the connection drops before any answer
                    self.connection.shutdown(2)
                    return
                hub.sent.append(f"{repo_id}/{path}")
            self.send_response(206 if ranged else 200)
            for key, value in {
                "Content-Length": str(end - start + 1), "ETag": f'"{commit.oids[path]}"', "X-Repo-Commit": commit.sha,
                "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                **({"Content-Range": f"bytes {start}-{end}/{size}"} if ranged else {}),
            }.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                with open(commit.files[path], "rb") as handle:
                    self.wfile.write(os.pread(handle.fileno(), end + 1 - start, start))
                hub.bytes_sent += end + 1 - start

    return Handler
