DROP TRIGGER clusters_created_with_an_owner ON clusters;
DROP TRIGGER clusters_have_an_owner ON user_clusters;
DROP FUNCTION dployr_clusters_have_an_owner();
DROP TRIGGER user_clusters_owner_kept ON user_clusters;
DROP FUNCTION dployr_user_clusters_owner_kept();
