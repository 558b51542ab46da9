// Files that never lie, as mercli.fsutil writes them; see fsutil.h.

#include "fsutil.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace getdcmtags {

// Crash points for tests (--inject-error N): the process _exit(70)s there, as if killed.
int gInject = 0;

void crashPoint(int n) {
    if (gInject == n) _exit(70);
}

// --- filesystem ----------------------------------------------------------------------------------

void fail(const std::string &path) {
    throw SysError(std::string(std::strerror(errno)) + " (" + path + ")");
}

void flockWithDeadline(int fd, int operation, double seconds, const std::string &path) {
    struct timespec start, now, pause = {0, 10 * 1000 * 1000};  // poll every 10 ms
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (flock(fd, operation | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK && errno != EINTR) fail(path);
        clock_gettime(CLOCK_MONOTONIC, &now);
        double waited =
            double(now.tv_sec - start.tv_sec) + 1e-9 * double(now.tv_nsec - start.tv_nsec);
        if (waited >= seconds) {
            errno = ETIMEDOUT;
            fail(path);
        }
        nanosleep(&pause, nullptr);
    }
}

void fsyncPath(const std::string &path, bool directory) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
    if (fd < 0) fail(path);
    if (fsync(fd) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        fail(path);
    }
    close(fd);
}

void writeAll(int fd, const std::string &data, const std::string &path) {
    size_t done = 0;
    while (done < data.size()) {
        ssize_t n = write(fd, data.data() + done, data.size() - done);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(path);
        }
        done += static_cast<size_t>(n);
    }
}

// mercli.fsutil.write_new: create exclusively (0640, whatever the umask: SPEC §9), write,
// fsync; unlinked again on failure.
void writeNew(const std::string &path, const std::string &data, bool sync) {
    const mode_t fileMode = 0640;  // mercli.fsutil.FILE_MODE
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, fileMode);
    if (fd < 0) fail(path);
    try {
        struct stat info;
        if (fstat(fd, &info) != 0) fail(path);
        if ((info.st_mode & 07777) != fileMode && fchmod(fd, fileMode) != 0) fail(path);
        writeAll(fd, data, path);
        if (sync && fsync(fd) != 0) fail(path);
    } catch (...) {
        close(fd);
        unlink(path.c_str());
        throw;
    }
    if (close(fd) != 0) {
        unlink(path.c_str());
        fail(path);
    }
}

void renameNoReplace(const std::string &from, const std::string &to) {
    if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) fail(to);
}

void removeTree(const std::string &path) {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
}

bool isDir(const std::string &path) {
    struct stat info;
    return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

}  // namespace getdcmtags
