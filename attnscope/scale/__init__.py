"""Corpus runs on Ray Data (the optional extra ``attnscope[scale]``).

``analyze_corpus(..., engine="ray")`` (or ``engine=RayEngine(...)``) hands its prompts to
``ray_batches``: Ray Data holds them in blocks sorted by length, an actor pool of ``CorpusWorker``s
(each loads the model once, on its GPUs when it has some) runs the local engine's
``analyze_in_batches`` on each block and returns one Arrow row per prompt (the files of its run),
and the calling process, the only writer of the corpus run, stores each prompt atomically unless
it is stored already. Ray is imported only when a run starts.
"""

from attnscope.scale.engine import RayEngine, ray_batches

__all__ = ["RayEngine", "ray_batches"]
