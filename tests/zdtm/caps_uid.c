/*
 * caps_uid: caps.c after a change to uid 1000 / gid 1001 that kept capabilities
 * (SECBIT_KEEP_CAPS): the restore must change uids without losing them.
 */
#define CAPS_UID 1000
#include "caps.c"
