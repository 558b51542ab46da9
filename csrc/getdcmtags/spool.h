#ifndef GETDCMTAGS_SPOOL_H
#define GETDCMTAGS_SPOOL_H

// The spool protocol of mercli/spool/, as mercli/receive/handler.py follows it: getdcmtags
// --publish moves staged files into incoming/<series>/ with their sidecars, or quarantines
// them in error/<id>/.

#include "sidecar.h"

#include <string>
#include <utility>
#include <vector>

namespace getdcmtags {

struct Sender {
    std::string callingAet, calledAet, address;
};

class Spool {
  public:
    explicit Spool(const std::string &root) : root_(root) {}

    // Checks the layout (creating missing folders, as Spool.open) and takes a lease.
    void open();

    // Worker.stop(): scratch, claims folder, then the lease (lock dropped on close).
    void close();

    // One staged file on its way through publishBatch.
    struct Entry {
        std::string path;
        Sender info;
        std::string line;  // the answer printed for it
        bool ok = false;
        Fields fields;
        std::string series, instance, tags;
    };

    // Publishes a batch of staged files with two barriers for all of them, not three fsyncs
    // per file: every .dcm and .tags is written, then syncfs() makes all of them durable at
    // once (a file is renamed into incoming/ only when whole on disk), then all are renamed
    // in, then a second syncfs() makes the renames durable. Unreadable files are quarantined
    // one by one, as before. Returns whether every file went to incoming/.
    bool publishBatch(std::vector<Entry> &batch);

  private:
    // Reads the file's tags; quarantines it if unreadable, else writes its sidecar into
    // scratch (not yet synced). True when the entry is ready to be renamed in.
    bool prepare(Entry &entry);

    void failAll(std::vector<Entry *> &ready, const std::string &what);

    std::string tmpPath();

    void startLease();

    std::string metadataJson(const Sender &info);

    // Spool.publish_to_group (protocol step 2) for entries of one series: their .dcm and
    // .tags renamed into incoming/<group> under one shared lock of it. Sets each entry's
    // line ("new"/"replaced", or "fail ..." with its sidecar removed) and ok.
    void publishToGroup(const std::string &group, std::vector<Entry *> &entries);

    // receiver._quarantine: error/<id>/instance.dcm + error.json, built in scratch.
    std::string quarantine(const std::string &path, const std::string &reason, int status,
                           const Sender &info);

    // EventLog.append: one line, one write(2), O_APPEND; failures only warned about.
    void logEvent(const std::string &body);
    void logEvents(const std::vector<std::string> &bodies);

    std::string root_;
    std::string owner_;
    std::string scratch_;
    int leaseFd_ = -1;
    int rootFd_ = -1;
    unsigned counter_ = 0;
};

}  // namespace getdcmtags

#endif  // GETDCMTAGS_SPOOL_H
