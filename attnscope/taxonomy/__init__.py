"""Head taxonomy: detector prompts (``detect``), retrieval heads with their ablation
(``retrieval``) and lookback-ratio features (``lookback``); the table itself is
``attnscope.headtable``."""
