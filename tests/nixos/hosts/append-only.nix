# A ZFS backup host whose senders may only add copies.
{
  boot.supportedFilesystems = [ "zfs" ];
  services.snapsync.receive = {
    enable = true;
    backend = "zfs";
    root = "tank/backup";
    user = "backup";
    appendOnly = true;
    authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILJq3Z39YbOwhQkTB+GmtbmxIaVd+bT9CUO37MlfW4FW root@laptop" ];
  };
}
