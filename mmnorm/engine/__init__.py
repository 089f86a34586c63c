"""What tools/train.py and tools/test.py run: their command line, config
loading, distributed set-up and runner, exact resume, AMP without a GPU,
checkpoint guards, data checks, hooks and the SyncBN rule."""
