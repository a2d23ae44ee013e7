"""What crosses the pipe between the master and a PacketAgent worker: the Job the master
hands over and the Outcome the worker (or a remote engine, through the master) gives back.
Plain dataclasses, pickled by multiprocessing; no logic that needs a process of its own.
"""
from dataclasses import dataclass, field

from _states import Result, State


@dataclass
class Job:
    """One task's work order; every path in it was checked against `roots` at admission
    and is checked again by the worker on what it actually opens."""
    speech_id: str
    candidates: list            # source paths to try in order (filePath/fileID, filePath/fileName)
    roots: list                 # allowed roots, resolved
    audio_path: str             # folder of the WAV and MP3 outputs
    stem: str                   # output file names: <stem>.wav, <stem>_A.wav, <stem>.mp3
    mp3_backup: bool = False
    keep_wav: bool = True
    source_after: str = 'keep'  # 'delete' or 'keep' after success
    keep_source: bool = False   # the request (or the scanner, which moves it itself) keeps the source
    error_backup_path: str = ''
    subtitles: tuple = ()       # subtitle formats written beside the WAV ('srt', 'vtt')
    low_confidence: float = 0.0  # segments below it are flagged lowConfidence


@dataclass
class Outcome:
    """How a task ended, as the worker or the engine tells it; `prepared` marks a worker's
    half of a remote-engine task (audio ready, the master sends the 3001)."""
    state: State
    result: Result
    message: str = None
    transcript: str = ''
    channels: list = field(default_factory=list)    # [{'channel': 'A', 'transcript': ...}]
    duration: float = None
    source_channels: int = None
    audio_wav: str = None
    audio_mp3: str = None
    prepared: bool = False
    segments: list = None       # [{'seq', 'channel', 'start', 'end', 'text', 'confidence', ...}]
    confidence: float = None    # mean word confidence of the task

    @classmethod
    def failed(cls, state, result, message):
        return cls(State(state), Result(result), message)

    @property
    def ok(self):
        return self.result == Result.OK
