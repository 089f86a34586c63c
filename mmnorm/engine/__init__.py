"""What tools/train.py and tools/test.py run: runner set-up, exact resume, AMP
without a GPU, checkpoint guards, data checks, hooks and the SyncBN rule."""
