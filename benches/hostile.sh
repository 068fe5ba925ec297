#!/usr/bin/env bash
# Hostile peers and local users against a real agent process (root): memory floods by an
# identity on no allow list and by an allowed one, connection and job-slot lockouts, a
# takeover of another sender's held job, planted symlinks and hard links, and 1,000
# token-less TCP lane connections against an agent limited to 256 open files. Prints a
# table of what was tried and whether it held. About a minute.
exec env TRIALS_ONLY=hostile "$(dirname "$0")/trials.sh" "$@"
