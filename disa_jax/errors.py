"""One error type for problems the user (or their environment) can fix.

Entry points print a `UserError` as one line, `error: <message>`, and exit with status 2,
leaving no partial output. The message names the problem and the fix. Module-specific
errors (e.g. conversion or checkpoint errors) subclass it.
"""


class UserError(ValueError):
  """A bad flag, config, file or environment: printed as one `error:` line, exit status 2."""
