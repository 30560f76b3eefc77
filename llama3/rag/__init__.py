"""Retrieval-augmented answers over the user's own files.

``documents`` reads files into headed sections, ``chunks`` cuts them by embedding tokens with overlap, ``index``
keeps a ``store`` up to date (content hashes: unchanged files skipped, removed files deleted), and ``answer``
retrieves, fits the sources into the context and asks the model to cite them. ``cli``: ``llama3 rag``.
"""
