"""Exceptions raised by wsi-idf. Every failure is an exception with a message a person can act on."""


class WsiIdfError(Exception):
    """Base class of every error wsi-idf raises on purpose."""


class InvalidPatchError(WsiIdfError, ValueError):
    """Input patches have the wrong shape, dtype or value range."""


class CorruptPatchError(WsiIdfError):
    """A stored patch is damaged: bad magic, truncated, or its pixel checksum does not match.
    ``index``: which of the patches given to the decoder, where known."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class WeightsMismatchError(WsiIdfError):
    """Data was written with other model weights than the ones available for decoding."""


class UnknownModelError(WsiIdfError, KeyError):
    """No model of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SlideError(WsiIdfError):
    """A slide file cannot be read: missing, not a slide, truncated, or not 8-bit RGB."""


class ArchiveError(WsiIdfError):
    """An archive is missing, incomplete, damaged, or its pixels do not match their checksums or source."""


class DamagedArchiveError(ArchiveError):
    """An archive's metadata is damaged, forged, or disagrees with its arrays."""


class ClusterError(WsiIdfError):
    """The Dask cluster cannot be reached or has no worker that can run the job."""


class VerificationError(ArchiveError):
    """Verification found damage or differences; ``damaged`` lists each undecodable patch as
    [level, x, y] (its top-left pixel), ``problems`` every finding."""

    def __init__(self, message: str, damaged: list | None = None, problems: list | None = None):
        super().__init__(message)
        self.damaged = damaged or []
        self.problems = problems or []
