#ifndef GETDCMTAGS_FSUTIL_H
#define GETDCMTAGS_FSUTIL_H

// Crash points for tests, and the file operations of mercli.fsutil: each throws SysError
// ("<strerror> (<path>)") on failure.

#include <stdexcept>
#include <string>

namespace getdcmtags {

// --inject-error N: crashPoint(N) _exit(70)s, as if the process were killed there.
extern int gInject;
void crashPoint(int n);

class SysError : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Throws SysError for errno and `path`.
[[noreturn]] void fail(const std::string &path);

// mercli.spool.items.locked_dir's deadline: flock `fd`, polling without blocking; after
// `seconds` fail with ETIMEDOUT, so a lock held forever by another process stalls nothing.
void flockWithDeadline(int fd, int operation, double seconds, const std::string &path);
void fsyncPath(const std::string &path, bool directory);
void writeAll(int fd, const std::string &data, const std::string &path);
// mercli.fsutil.write_new: create exclusively, write, fsync; unlinked again on failure.
void writeNew(const std::string &path, const std::string &data, bool sync = true);
// rename(2) that fails instead of replacing `to`.
void renameNoReplace(const std::string &from, const std::string &to);
void removeTree(const std::string &path);
bool isDir(const std::string &path);

}  // namespace getdcmtags

#endif  // GETDCMTAGS_FSUTIL_H
