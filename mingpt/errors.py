"""
The errors a user can cause, in one small hierarchy.

Every error the library raises for bad input, a bad file or a failed download is a MinGPTError, so a
command-line tool catches that one type and prints its message as one line (mingpt.utils.run_script).
Each is also the built-in type a caller would catch anyway, so plain Python code needs to know nothing
of this module:

    MinGPTError
      ConfigError       ValueError   a config value or an argument that cannot work (says what to set)
        PromptTooLong   ValueError   a prompt or conversation that does not fit in the model's context
      WeightsError      ValueError   a model checkpoint that cannot be loaded (missing, corrupt, mismatched)
      CheckpointError   ValueError   a trainer checkpoint that cannot be resumed
      DataError         ValueError   a text or token-shard file that cannot be read as training data
      MissingFileError  OSError      a file or directory the user named that is not there (FileNotFoundError)
      DownloadError     OSError      a file that could not be fetched or failed its checks

Messages say what is wrong and what to do about it. `assert` stays for the library's own invariants.
"""


class MinGPTError(Exception):
    """ the base of every error a user can cause; its message is meant to be read by that user """


class ConfigError(MinGPTError, ValueError):
    """ a config value or argument that cannot work: out of range, of the wrong type, or inconsistent """


class WeightsError(MinGPTError, ValueError):
    """ a checkpoint that cannot be loaded: missing, corrupt, or not the shape its config says """


class CheckpointError(MinGPTError, ValueError):
    """ a trainer checkpoint that is missing, unreadable, or does not fit this model / config """


class PromptTooLong(ConfigError):
    """ a prompt longer than the model's context, or a conversation that does not fit in the token
    budget even with its old turns dropped: an argument that cannot work, so also a ConfigError """


class DataError(MinGPTError, ValueError):
    """ training data that cannot be read: a text file that is not UTF-8 text, a token shard that is
    not one or is cut short, a shard directory that prepare has not finished """


class MissingFileError(MinGPTError, FileNotFoundError):
    """ a path the user gave that does not exist; also a FileNotFoundError, what open() would raise """


class DownloadError(MinGPTError, OSError):
    """ a file could not be fetched or failed its checks; the message says what to do instead """
