"""A fake Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub 2.4 calls, nothing more.

Writes: `create_repo` (POST /api/repos/create), the README metadata check (POST /api/validate-yaml), `preupload`
(which files go through LFS), the LFS batch API with the "basic" transfer (a PUT to an upload URL on this server,
then "verify"), and `commit` (ndjson: inline base64 "file" entries and "lfsFile" pointers to uploaded objects).
Reads: repo info (GET /api/models/{repo}[/revision/{rev}]), the tree listing and `resolve` (HEAD and GET), which is
what `hf_hub_download` and `snapshot_download` need. The Xet protocol is not served: tests must disable it.

Example:

>>> with HubServer() as server:
...     HfApi(endpoint=server.endpoint, token=FAKE_TOKEN).create_repo("alice/adapter")
...     server.fail_next(2)  # the next two POST/PUT requests answer 500
...     server.fail_next(1, status=400, echo_headers=True)  # an error whose message repeats the request's headers
...     server.hang = True  # accept every connection and never answer (until the server stops)
"""

import base64
import hashlib
import json
import re
import socket
import threading
import time
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


FAKE_TOKEN = "hf_testtoken_DO_NOT_LEAK_123"

# Like the Hub: a file goes through LFS when .gitattributes tracks it (the default one tracks these), when it is
# larger than 10 MB, or when it is binary.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.model", "*.zip")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub reports as a regular file's `oid` and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    sha = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(content)}\n".encode()


def use_hub(monkeypatch, endpoint: str, token: str = FAKE_TOKEN, as_default: bool = False) -> None:
    """Point huggingface_hub at `endpoint` with `token`, over plain HTTP (no Xet).

    huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET once, into `constants`, when it is imported, and
    `is_xet_available()` and `HfApi()` read those constants: the variables alone come too late for this process.
    The same goes for HF_HUB_OFFLINE, which is turned off here.
    With hf_xet installed and Xet on, uploads and downloads would go to a Xet storage server, which the fake Hub is
    not. `as_default` also makes `endpoint` the default one (`constants.ENDPOINT`), for code that passes none, such
    as a callback built from a recipe, and the download URL template, so that `snapshot_download(repo_id)` reads from
    it too.
    """
    import huggingface_hub

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # The fake Hub is a server like any other: whoever runs the suite with HF_HUB_OFFLINE=1 set, these tests talk
    # to it (huggingface_hub read the variable into `constants` when it was imported; subprocesses read the variable).
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if as_default:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        # Downloads build their URL from this template, made from the default endpoint at import.
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def closed_endpoint() -> str:
    """An http://127.0.0.1 URL nothing listens on: a Hub that is down (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Repo:
    def __init__(self, private: bool):
        self.private = private
        self.lfs_paths: set[str] = set()
        # (commit oid, full tree), oldest first; like the Hub, a new repo starts with one commit
        self.history: list[tuple[str, dict[str, bytes]]] = [(hashlib.sha1(str(time.time()).encode()).hexdigest(), {})]

    def resolve(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.history[-1]
        return next((entry for entry in self.history if entry[0] == revision), None)


class HubServer:
    """Runs the fake Hub in a thread; use it as a context manager.

    Attributes:
        endpoint (`str`): `http://127.0.0.1:<port>`, to pass as `endpoint=`.
        tokens (`set[str]`): accepted tokens; any other `Authorization: Bearer` token gets 401.
        commits (`list[dict]`): every commit made through the API: `{"repo_id", "message", "oid", "files"}` with
            `files` the `{path: bytes}` the commit added.
        requests (`list[dict]`): every request: `{"method", "path", "headers", "body", "status"}`, header names
            in lower case.
        hang (`bool`): when true, every request is read and never answered until the server stops (then its
            connection is closed): a Hub that accepts connections and never answers.
    """

    def __init__(self, tokens: set[str] | None = None):
        self.tokens = {FAKE_TOKEN} if tokens is None else set(tokens)
        self.repos: dict[str, _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.requests: list[dict] = []
        self._fail_count = 0
        self._fail_status = 500
        self._fail_path = ""
        self._fail_echo = False
        self.hang = False
        self.released = threading.Event()  # set when the server stops: hanging requests end then
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def fail_next(self, count: int, status: int = 500, path: str = "", echo_headers: bool = False) -> None:
        """Answer the next `count` write requests (POST or PUT) whose path contains `path` with `status`; with
        `echo_headers`, the error message repeats the request's headers, `Authorization` included (as some proxies
        and misconfigured servers do)."""
        with self.lock:
            self._fail_count, self._fail_status, self._fail_path = count, status, path
            self._fail_echo = echo_headers

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision`."""
        return dict(self.repos[repo_id].resolve(revision)[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive between tests

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    # -- plumbing --------------------------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None) -> None:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        body = body or b""
        headers.setdefault("Content-Length", str(len(body)))
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        headers = {"X-Error-Message": message, **(headers or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        entry = {
            "method": self.command,
            "path": path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
            "status": None,
        }
        hub = self.hub
        with hub.lock:
            hub.requests.append(entry)
            fail = self.command in ("POST", "PUT") and hub._fail_count > 0 and hub._fail_path in path
            if fail:
                hub._fail_count -= 1
        if hub.hang:
            hub.released.wait()
            self.close_connection = True
            return
        try:
            if fail and hub._fail_echo:
                headers = {key: value for key, value in self.headers.items() if key.lower() != "authorization"}
                echo = f"Bad request with Authorization: {self.headers.get('Authorization')}; headers: {headers}"
                self._error(hub._fail_status, echo)
            elif fail:
                self._error(hub._fail_status, "Internal Error - We're working hard to fix this as soon as possible!")
            elif self._auth_error(path):
                self._error(401, "Invalid credentials in Authorization header")
            else:
                with hub.lock:
                    self._route(path, query, body)
        finally:
            entry["status"] = getattr(self, "_status", None)

    def _auth_error(self, path: str) -> bool:
        # LFS uploads go to a pre-signed URL that carries no token, like S3 on the real Hub.
        if path.startswith("/lfs-upload/"):
            return False
        header = self.headers.get("Authorization")
        if header is None:
            return self.command in ("POST", "PUT")
        return not header.startswith("Bearer ") or header[len("Bearer ") :] not in self.hub.tokens

    def _route(self, path: str, query: dict, body: bytes) -> None:
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<prefix>.*))?", self._tree),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_upload),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filename>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filename>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                kwargs = match.groupdict()
                if "repo" in kwargs and kwargs["repo"] not in self.hub.repos:
                    return self._error(404, "Repository not found", "RepoNotFound")
                return handler(body=body, query=query, **kwargs)
        self._error(404, f"fake hub: no route for {self.command} {path}")

    def _revision(self, repo: str, rev: str | None):
        found = self.hub.repos[repo].resolve(rev or "main")
        if found is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return found

    # -- writes ----------------------------------------------------------------------------------------------

    def _create_repo(self, body: bytes, **_) -> None:
        payload = json.loads(body)
        repo_id = f"{payload['organization'] or 'user'}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self.hub.repos[repo_id] = _Repo(private=payload.get("visibility", "public") == "private")
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, body: bytes, **_) -> None:
        content = json.loads(body)["content"]
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: str, rev: str, body: bytes, **_) -> None:
        found = self._revision(repo, rev)
        if found is None:
            return
        tree, lfs_paths = found[1], self.hub.repos[repo].lfs_paths
        files = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            lfs = any(fnmatch(file["path"], p) for p in LFS_PATTERNS)
            lfs = lfs or file["size"] > LFS_SIZE_THRESHOLD or b"\0" in sample
            old = tree.get(file["path"])
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if file["path"] in lfs_paths else git_blob_oid(old)
            files.append(
                {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": files, "commitOid": found[0]})

    def _lfs_batch(self, repo: str, body: bytes, **_) -> None:
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, oid: str, body: bytes, **_) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 of the uploaded content does not match the object id")
        self.hub.lfs_objects[oid] = body
        self._send(200)

    def _lfs_verify(self, body: bytes, **_) -> None:
        payload = json.loads(body)
        stored = self.hub.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            return self._error(404, f"LFS object {payload['oid']} was not uploaded")
        self._send(200, {})

    def _commit(self, repo: str, rev: str, body: bytes, **_) -> None:
        found = self._revision(repo, rev)
        if found is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        tree, added, lfs_added, deleted = dict(found[1]), {}, set(), []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                added[value["path"]] = self.hub.lfs_objects[value["oid"]]
                lfs_added.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
                for path in [p for p in tree if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]:
                    del tree[path]
        tree.update(added)
        repo_state = self.hub.repos[repo]
        repo_state.lfs_paths = (repo_state.lfs_paths - set(added)) | lfs_added
        oid = hashlib.sha1(f"{found[0]}{header['summary']}{time.time_ns()}".encode()).hexdigest()
        repo_state.history.append((oid, tree))
        self.hub.commits.append(
            {"repo_id": repo, "message": header["summary"], "oid": oid, "files": added, "deleted": deleted}
        )
        url = f"{self.hub.endpoint}/{repo}/commit/{oid}"
        self._send(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None, "success": True})

    # -- reads -----------------------------------------------------------------------------------------------

    def _file_entry(self, repo: str, path: str, content: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)}
        if path in self.hub.repos[repo].lfs_paths:
            pointer = lfs_pointer(content)
            entry["oid"] = git_blob_oid(pointer)
            entry["lfs"] = {
                "oid": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "pointerSize": len(pointer),
            }
        return entry

    def _repo_info(self, repo: str, rev: str | None = None, **_) -> None:
        found = self._revision(repo, rev)
        if found is None:
            return
        siblings = [{"rfilename": path} for path in sorted(found[1])]
        info = {"id": repo, "modelId": repo, "sha": found[0], "private": self.hub.repos[repo].private}
        self._send(200, {**info, "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def _tree(self, repo: str, rev: str, prefix: str | None = None, **_) -> None:
        found = self._revision(repo, rev)
        if found is None:
            return
        prefix = (prefix or "").strip("/")
        entries = [
            self._file_entry(repo, path, content)
            for path, content in sorted(found[1].items())
            if not prefix or path.startswith(prefix + "/")
        ]
        self._send(200, entries)

    def _resolve(self, repo: str, rev: str, filename: str, **_) -> None:
        found = self._revision(repo, rev)
        if found is None:
            return
        commit, tree = found
        if filename not in tree:
            return self._error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit})
        content = tree[filename]
        lfs = filename in self.hub.repos[repo].lfs_paths
        etag = hashlib.sha256(content).hexdigest() if lfs else git_blob_oid(content)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        self._send(200, content, headers)
