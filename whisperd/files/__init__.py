"""Files whisperd writes or moves, always inside configured folders.

`safepath` opens paths beneath a folder without following links; `atomic`
is the one atomic write; `names` fits derived names to NAME_MAX;
`repeat_names` names a file dropped again; `outputs` writes transcripts,
error notes and moves sources. May import: config, jobs, errors.
"""
