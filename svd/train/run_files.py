"""The small files a run keeps beside its checkpoints, in the same storage: `<run_dir>/config.yaml`,
`validation.jsonl`, `previews/step-….mp4|gif`, `lora.safetensors`.

They are written by rank 0 only, whole (an object store replaces an object in one PUT), so a reader never
sees half a file; appending to a JSON-lines file rewrites it, which is fine for a line per validation.
"""

from __future__ import annotations

from svd.data.storage import Storage, join


class RunFiles:
    def __init__(self, run_dir: str, storage: Storage):
        self.run_dir = run_dir
        self.storage = storage

    def uri(self, name: str) -> str:
        return join(self.run_dir, name)

    def write(self, name: str, data: str | bytes) -> None:
        fs, path = self.storage.fsspec(self.uri(name))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data.encode() if isinstance(data, str) else data)

    def read(self, name: str) -> str | None:
        """The file's text, None when it does not exist (any other read error propagates)."""
        fs, path = self.storage.fsspec(self.uri(name))
        try:
            return fs.cat_file(path).decode()
        except FileNotFoundError:
            return None

    def append_line(self, name: str, line: str) -> None:
        self.write(name, (self.read(name) or "") + line + "\n")
