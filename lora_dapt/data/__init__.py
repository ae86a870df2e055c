"""Raw text and instruction rows -> fixed-length training blocks.

``sources`` resolves paths, globs, directories (the rules: ``resolve``), datasets and texts (reading files
with ``formats``) into a documents table; ``clean`` filters, de-duplicates and splits it; ``pieces`` tokenizes and packs with the
pure functions of ``packing``; ``corpus`` orchestrates and caches (:func:`~.corpus.prepare_corpus`, results
in ``stats``). ``conversations`` and ``chat`` do the same for SFT rows: formats, chat templates and
assistant-only labels.
"""
