// The publish mode's spool; see spool.h.

#include "spool.h"

#include "fsutil.h"
#include "names.h"
#include "text.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>

namespace getdcmtags {

// Seconds a group lock may be waited for (LOCK_DEADLINE in mercli/spool/items.py).
constexpr double kLockDeadline = 3.0;

namespace {

// SPEC §9, as mercli.fsutil: files 0640, folders 0750 (plus the setgid bit a folder inherits
// from a setgid spool), whatever the umask; a umask only narrows, so set back what it took.
const mode_t kFileMode = 0640;
const mode_t kDirMode = 0750;

void giveFileMode(int fd, const std::string &path) {
    struct stat info;
    if (fstat(fd, &info) != 0) fail(path);
    if ((info.st_mode & 07777) != kFileMode && fchmod(fd, kFileMode) != 0) fail(path);
}

// mkdir with kDirMode; false (errno set) if it failed. A folder renamed away at once is fine.
bool makeDir(const std::string &path) {
    if (mkdir(path.c_str(), kDirMode) != 0) return false;
    struct stat info;
    if (lstat(path.c_str(), &info) == 0 && (info.st_mode & 0777) != kDirMode)
        chmod(path.c_str(), kDirMode | (info.st_mode & S_ISGID));
    return true;
}

}  // namespace

void Spool::open() {
    if (!isDir(root_)) {
        errno = ENOTDIR;
        fail(root_);
    }
    const char *folders[] = {"tmp",    "incoming", "outgoing", "success", "discard",
                             "error",  "leases",   "claims",   "hints",   "events"};
    dev_t device = 0;
    for (const char *name : folders) {
        std::string folder = root_ + "/" + name;
        if (!isDir(folder)) {
            if (!makeDir(folder) && errno != EEXIST) fail(folder);
            fsyncPath(root_, true);
        }
        struct stat info;
        if (stat(folder.c_str(), &info) != 0) fail(folder);
        if (device != 0 && info.st_dev != device)
            throw SysError("spool folders span several filesystems (" + root_ + ")");
        device = info.st_dev;
    }
    rootFd_ = ::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (rootFd_ < 0) fail(root_);
    startLease();
}

void Spool::close() {
    if (leaseFd_ < 0) return;
    removeTree(scratch_);
    removeTree(root_ + "/claims/" + owner_);
    unlink((root_ + "/leases/" + owner_).c_str());
    ::close(leaseFd_);
    leaseFd_ = -1;
}

bool Spool::publishBatch(std::vector<Entry> &batch) {
    std::vector<Entry *> ready;
    for (Entry &entry : batch)
        if (prepare(entry)) ready.push_back(&entry);
    crashPoint(1);
    if (!ready.empty() && syncfs(rootFd_) != 0) failAll(ready, "syncfs (" + root_ + ")");
    // Consecutive entries of one series (the rule: a batch is mostly one association) share
    // one open and shared lock of their group, not one each.
    for (size_t first = 0; first < ready.size();) {
        size_t end = first;
        while (end < ready.size() && ready[end]->series == ready[first]->series) ++end;
        std::vector<Entry *> run(ready.begin() + first, ready.begin() + end);
        publishToGroup(ready[first]->series, run);
        first = end;
    }
    crashPoint(4);
    bool published = false;
    for (Entry *entry : ready) published = published || entry->ok;
    if (published && syncfs(rootFd_) != 0)
        std::cerr << "Warning: syncfs after publishing failed (" << std::strerror(errno) << ")\n";
    crashPoint(5);
    bool allOk = true;
    std::vector<std::string> events;
    for (Entry &entry : batch) {
        if (!entry.ok) {
            allOk = false;
            continue;
        }
        events.push_back("\"event\":\"received\",\"series\":" + jsonString(entry.series) +
                         ",\"instance\":" + jsonString(entry.instance) + ",\"sender\":" +
                         jsonString(entry.info.callingAet) + ",\"replaced\":" +
                         (entry.line == "replaced" ? "true" : "false"));
        entry.line = "ok " + entry.series + "/" + entry.instance;
    }
    logEvents(events);
    return allOk;
}

bool Spool::prepare(Entry &entry) {
    std::string reason;
    int status = 0;
    try {
        entry.fields = sidecarFields(entry.path.c_str());
        std::vector<std::string> missing;
        for (const char *uid : {"SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"}) {
            bool found = false;
            for (const auto &field : entry.fields) found = found || field.first == uid;
            if (!found) missing.push_back(uid);
        }
        for (size_t i = 0; i < missing.size(); ++i)
            reason += (i ? ", " : "missing ") + missing[i];
        if (!missing.empty()) status = 0xC212;
    } catch (const Unreadable &error) {
        reason = error.what();
        status = 0xC210;
    }
    try {
        struct stat st;
        if (lstat(entry.path.c_str(), &st) != 0) fail(entry.path);
        if (!S_ISREG(st.st_mode)) throw SysError("not a regular file (" + entry.path + ")");
        if (status != 0) {
            crashPoint(1);
            fsyncPath(entry.path, false);
            std::string item = quarantine(entry.path, reason, status, entry.info);
            entry.line = "error " + item + " " + reason;
            return false;
        }
        for (const auto &field : entry.fields) {
            if (field.first == "SeriesInstanceUID") entry.series = safeName(pyStr(field.second));
            if (field.first == "SOPInstanceUID") entry.instance = safeName(pyStr(field.second));
        }
        std::string sidecar = toJson(entry.fields);
        sidecar.insert(sidecar.size() - 1, metadataJson(entry.info));
        entry.tags = tmpPath();
        writeNew(entry.tags, sidecar, false);
        return true;
    } catch (const SysError &error) {
        entry.line = std::string("fail ") + error.what();
        return false;
    }
}

void Spool::failAll(std::vector<Entry *> &ready, const std::string &what) {
    std::string reason = std::string(std::strerror(errno)) + " " + what;
    for (Entry *entry : ready) {
        unlink(entry->tags.c_str());
        entry->line = "fail " + reason + " (" + entry->path + ")";
    }
    ready.clear();
}

std::string Spool::tmpPath() {
    return scratch_ + "/" + std::to_string(++counter_) + "." + newId();
}

void Spool::startLease() {
    owner_ = ownerId();
    std::string born = root_ + "/tmp/lease." + owner_;
    // Born 0600: no one else can open it, let alone lock it, before it is locked here.
    int fd = ::open(born.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) fail(born);
    try {
        if (flock(fd, LOCK_EX) != 0) fail(born);
        giveFileMode(fd, born);
        std::string record = "{\"role\": \"getdcmtags\", \"host\": " + jsonAscii(nodename()) +
                             ", \"pid\": " + std::to_string(getpid()) + ", \"started\": \"" +
                             isoformat(now(), 0) + "\"}";
        writeAll(fd, record, born);
        if (fsync(fd) != 0) fail(born);
        crashPoint(7);
        renameNoReplace(born, root_ + "/leases/" + owner_);
        fsyncPath(root_ + "/leases", true);
        scratch_ = root_ + "/tmp/" + owner_;
        if (!makeDir(scratch_)) fail(scratch_);
        std::string claims = root_ + "/claims/" + owner_;
        if (!makeDir(claims)) fail(claims);
    } catch (...) {
        ::close(fd);
        unlink(born.c_str());
        throw;
    }
    leaseFd_ = fd;
}

std::string Spool::metadataJson(const Sender &info) {
    return ",\"SenderAET\":" + jsonString(info.callingAet) +
           ",\"SenderAddress\":" + jsonString(info.address) +
           ",\"ReceiverAET\":" + jsonString(info.calledAet) + ",\"ReceivedAt\":\"" +
           isoformat(now(), 3) + "\"";
}

void Spool::logEvent(const std::string &body) { logEvents({body}); }

void Spool::logEvents(const std::vector<std::string> &bodies) {
    if (bodies.empty()) return;
    Clock clock = now();
    char day[32];
    std::strftime(day, sizeof day, "%Y-%m-%d", &clock.utc);
    // A batch's lines in one append: one open and one write, not four calls per instance.
    std::string line, at = "{\"at\":\"" + isoformat(clock, 6) + "\",";
    for (const std::string &body : bodies) line += at + body + "}\n";
    std::string file = root_ + "/events/" + day + ".ndjson";
    int flags = O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC;
    int fd = ::open(file.c_str(), flags, kFileMode);
    struct stat info;
    if (fd >= 0 && fstat(fd, &info) == 0 && (info.st_mode & 07777) != kFileMode)
        fchmod(fd, kFileMode);
    if (fd < 0 || write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
        std::cerr << "Warning: event log unwritable (" << std::strerror(errno) << ")\n";
    if (fd >= 0) ::close(fd);
}

void Spool::publishToGroup(const std::string &group, std::vector<Entry *> &entries) {
    std::string incoming = root_ + "/incoming";
    std::string directory = incoming + "/" + group;
    auto failed = [](Entry *entry, const std::string &why) {
        unlink(entry->tags.c_str());
        entry->line = "fail " + why;
    };
    std::vector<Entry *> movable;
    for (Entry *entry : entries) {
        try {  // storescp made the dataset file, with its own mode
            struct stat info;
            if (lstat(entry->path.c_str(), &info) != 0) fail(entry->path);
            if ((info.st_mode & 07777) != kFileMode && chmod(entry->path.c_str(), kFileMode) != 0)
                fail(entry->path);
            movable.push_back(entry);
        } catch (const SysError &error) {
            failed(entry, error.what());
        }
    }
    if (movable.empty()) return;
    crashPoint(2);
    int fd = -1;
    try {
        for (;;) {
            if (makeDir(directory)) {
                fsyncPath(incoming, true);
            } else if (errno != EEXIST) {
                fail(directory);
            }
            fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (fd < 0) {
                if (errno == ENOENT || errno == ENOTDIR) continue;
                fail(directory);
            }
            flockWithDeadline(fd, LOCK_SH, kLockDeadline, directory);
            struct stat current, mine;
            if (lstat(directory.c_str(), &current) == 0 && fstat(fd, &mine) == 0 &&
                current.st_ino == mine.st_ino && current.st_dev == mine.st_dev)
                break;
            ::close(fd);  // claimed away between mkdir and lock: make a new group
            fd = -1;
        }
    } catch (const SysError &error) {
        if (fd >= 0) ::close(fd);
        for (Entry *entry : movable) failed(entry, error.what());
        return;
    }
    for (Entry *entry : movable) {
        const std::pair<std::string, std::string> files[] = {
            {entry->path, entry->instance + ".dcm"}, {entry->tags, entry->instance + ".tags"}};
        bool replaced = false;
        try {
            for (size_t i = 0; i < 2; ++i) {
                if (i == 1) crashPoint(3);
                // New names are the rule: try without replacing, and replace (a resent
                // instance) only when the name is taken; no lookup of its own per file.
                const char *from = files[i].first.c_str(), *to = files[i].second.c_str();
                if (renameat2(AT_FDCWD, from, fd, to, RENAME_NOREPLACE) == 0) continue;
                if (errno != EEXIST || renameat(AT_FDCWD, from, fd, to) != 0)
                    fail(directory + "/" + files[i].second);
                replaced = true;
            }
            entry->line = replaced ? "replaced" : "new";
            entry->ok = true;
        } catch (const SysError &error) {
            failed(entry, error.what());
        }
    }
    ::close(fd);
}

std::string Spool::quarantine(const std::string &path, const std::string &reason, int status,
                       const Sender &info) {
    std::string item = newId();
    std::string folder = tmpPath();
    if (!makeDir(folder)) fail(folder);
    std::string instance = folder + "/instance.dcm";
    bool moved = false;
    try {
        if (rename(path.c_str(), instance.c_str()) != 0) fail(path);
        moved = true;
        if (chmod(instance.c_str(), kFileMode) != 0) fail(instance);
        char code[16];
        std::snprintf(code, sizeof code, "0x%04X", status);
        std::string record = "{\n \"reason\": " + jsonAscii(reason) + ",\n \"at\": \"" +
                             isoformat(now(), 0) + "\",\n \"from\": \"receive\",\n" +
                             " \"status\": \"" + code + "\",\n \"SenderAET\": " +
                             jsonAscii(info.callingAet) + ",\n \"SenderAddress\": " +
                             jsonAscii(info.address) + ",\n \"ReceiverAET\": " +
                             jsonAscii(info.calledAet) + ",\n \"ReceivedAt\": \"" +
                             isoformat(now(), 3) + "\"\n}";
        writeNew(folder + "/error.json", record);
        crashPoint(6);
        fsyncPath(folder, true);
        std::string errors = root_ + "/error";
        renameNoReplace(folder, errors + "/" + item);
        fsyncPath(errors, true);
    } catch (...) {
        if (moved) rename(instance.c_str(), path.c_str());  // give the file back
        removeTree(folder);
        throw;
    }
    logEvent("\"event\":\"quarantined\",\"item\":" + jsonString(item) + ",\"reason\":" +
             jsonString(reason) + ",\"sender\":" + jsonString(info.callingAet));
    return item;
}

}  // namespace getdcmtags
